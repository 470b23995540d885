//! Body digests (`apache.rocketmq.v2.Digest`): how a checksum of a message body is written
//! and checked.
//!
//! A digest is of the body as it travels, before any decompression. Checksums are
//! upper-case hex. Clients differ on the leading zeros of a CRC32 (IEEE): the Java client
//! leaves them out, the Python client writes them. So a CRC32 is compared as a number, and
//! written as the Java client writes it, without them, so that a server in Java comparing
//! strings would take it too.

use crate::v2::{Digest, DigestType};

/// The body's CRC32 (IEEE) digest: the cheapest, for a sender to compute and a receiver
/// to check.
#[must_use]
pub fn crc32(body: &[u8]) -> Digest {
    Digest {
        r#type: DigestType::Crc32 as i32,
        checksum: format!("{:X}", crc32fast::hash(body)),
    }
}

/// The body's MD5 digest.
#[must_use]
pub fn md5(body: &[u8]) -> Digest {
    use md5::Digest as _;
    Digest {
        r#type: DigestType::Md5 as i32,
        checksum: hex_upper(&md5::Md5::digest(body)),
    }
}

/// True when `body` has the digest `d`. A digest of a type this does not know
/// (unspecified, or newer than this code) is not checked and counts as a match.
#[must_use]
pub fn matches(d: &Digest, body: &[u8]) -> bool {
    let expected = d.checksum.trim();
    match DigestType::try_from(d.r#type) {
        Ok(DigestType::Crc32) => {
            u32::from_str_radix(expected, 16).is_ok_and(|v| v == crc32fast::hash(body))
        }
        Ok(DigestType::Md5) => {
            use md5::Digest as _;
            expected.eq_ignore_ascii_case(&hex_upper(&md5::Md5::digest(body)))
        }
        Ok(DigestType::Sha1) => {
            use sha1::Digest as _;
            expected.eq_ignore_ascii_case(&hex_upper(&sha1::Sha1::digest(body)))
        }
        _ => true,
    }
}

/// `bytes` as upper-case hex, two digits each: the form of the protocol's checksums (and of
/// the official clients' message ids and request signatures).
#[must_use]
pub fn hex_upper(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02X}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(t: DigestType, checksum: &str) -> Digest {
        Digest {
            r#type: t as i32,
            checksum: checksum.into(),
        }
    }

    #[test]
    fn written_digests_are_upper_case_hex_and_match_their_body() {
        assert_eq!(crc32(b"hello").checksum, "3610A686");
        assert_eq!(crc32(b"a").checksum, "E8B7BE43");
        // Without leading zeros.
        assert_eq!(crc32(b"m21").checksum, "3E0D52A");
        assert_eq!(md5(b"hello").checksum, "5D41402ABC4B2A76B9719D911017C592");
        for body in [&b"hello"[..], b"", b"\x00\xff"] {
            assert!(matches(&crc32(body), body));
            assert!(matches(&md5(body), body));
        }
    }

    #[test]
    fn every_type_is_checked_and_case_and_leading_zeros_do_not_matter() {
        use DigestType::*;
        let ok = [
            digest(Md5, "5d41402abc4b2a76b9719d911017c592"),
            digest(Md5, "5D41402ABC4B2A76B9719D911017C592"),
            digest(Sha1, "AAF4C61DDCC5E8A2DABEDE0F3B482CD9AEA9434D"),
            digest(Crc32, "3610A686"),
            digest(Crc32, "3610a686"),
            digest(Unspecified, "anything"),
        ];
        for d in ok {
            assert!(matches(&d, b"hello"), "{d:?}");
        }
        assert!(matches(&digest(Crc32, "3E0D52A"), b"m21"));
        assert!(matches(&digest(Crc32, "03E0D52A"), b"m21"));
        let bad = [
            digest(Md5, "5D41402ABC4B2A76B9719D911017C592"),
            digest(Sha1, "AAF4C61DDCC5E8A2DABEDE0F3B482CD9AEA9434D"),
            digest(Crc32, "3610A686"),
            digest(Crc32, "not hex"),
            digest(Md5, ""),
        ];
        for d in bad {
            assert!(!matches(&d, b"hellO"), "{d:?}");
        }
    }
}
