//! A simulated file system for crash tests.
//!
//! Each file keeps two copies: the bytes *written* (what reads see) and the bytes made
//! *durable* by the last `sync_data`. Directory entries, of files and of directories alike,
//! are likewise live or durable (after `sync_dir` of their parent). [`SimIo::crash`] builds
//! the image a power loss would leave: durable entries under durable directories only, and for every file its durable bytes with each 512-byte sector of
//! un-synced data either kept or lost at random, so a torn write can land partially and out
//! of order.
//!
//! Faults: [`SimIo::cut_power_after`] makes every mutating operation from the chosen one on
//! fail (the machine is off), [`SimIo::fail_next_sync`] makes one `sync_data` fail without
//! making anything durable, and [`SimIo::set_capacity`] makes writes past a total size fail
//! with `ENOSPC`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Io, IoFile};

const SECTOR: usize = 512;

/// In-memory [`Io`] with power-loss simulation. Cloning shares the same file system.
#[derive(Clone, Default)]
pub struct SimIo {
    state: Arc<Mutex<SimState>>,
}

#[derive(Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Entry {
    Dir,
    File(usize),
}

#[derive(Default)]
struct SimState {
    inodes: Vec<Inode>,
    live: BTreeMap<PathBuf, Entry>,
    durable: BTreeMap<PathBuf, Entry>,
    mutations: u64,
    cut_at: Option<u64>,
    fail_next_sync: bool,
    capacity: Option<u64>,
}

impl SimState {
    /// Counts one mutating operation and fails it if the power is already off.
    fn mutate(&mut self) -> io::Result<()> {
        if let Some(cut) = self.cut_at
            && self.mutations >= cut
        {
            return Err(io::Error::other("simulated power loss"));
        }
        self.mutations += 1;
        Ok(())
    }

    fn used(&self) -> u64 {
        self.inodes.iter().map(|i| i.data.len() as u64).sum()
    }

    fn grow(&mut self, ino: usize, len: usize) -> io::Result<()> {
        let cur = self.inodes[ino].data.len();
        if len <= cur {
            return Ok(());
        }
        if let Some(cap) = self.capacity
            && self.used() + (len - cur) as u64 > cap
        {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inodes[ino].data.resize(len, 0);
        Ok(())
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

impl SimIo {
    /// An empty simulated file system.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of mutating operations (writes, syncs, truncations, allocations, renames,
    /// removals, creations) performed so far.
    pub fn mutations(&self) -> u64 {
        self.lock().mutations
    }

    /// Cuts the power once `n` mutating operations in total have been performed: that
    /// operation and every one after it fail and change nothing.
    pub fn cut_power_after(&self, n: u64) {
        self.lock().cut_at = Some(n);
    }

    /// Makes the next `sync_data` fail with `EIO`, leaving its data un-synced.
    pub fn fail_next_sync(&self) {
        self.lock().fail_next_sync = true;
    }

    /// Limits the total size of all files; a write or allocation past it fails with `ENOSPC`.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// Total bytes held by all files, durable or not.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used()
    }

    /// The file system a power loss right now would leave: durable directory entries, and for
    /// each file its durable bytes with each un-synced sector kept or lost as `seed` decides.
    pub fn crash(&self, seed: u64) -> SimIo {
        let st = self.lock();
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut out = SimState::default();
        let mut map = BTreeMap::new();
        // An entry survives if it and every directory above it were made durable.
        let reachable = |path: &Path| {
            path.ancestors()
                .skip(1)
                .all(|dir| is_root(dir) || st.durable.get(dir) == Some(&Entry::Dir))
        };
        for (path, entry) in st.durable.iter().filter(|(p, _)| reachable(p)) {
            let entry = match *entry {
                Entry::Dir => Entry::Dir,
                Entry::File(ino) => {
                    let new_ino = *map.entry(ino).or_insert_with(|| {
                        let image = torn_image(&st.inodes[ino], &mut rng);
                        out.inodes.push(Inode {
                            data: image.clone(),
                            durable: image,
                        });
                        out.inodes.len() - 1
                    });
                    Entry::File(new_ino)
                }
            };
            out.live.insert(path.clone(), entry);
            out.durable.insert(path.clone(), entry);
        }
        SimIo {
            state: Arc::new(Mutex::new(out)),
        }
    }

    /// Flips one bit of a file's bytes (written and durable), to simulate media corruption.
    ///
    /// # Panics
    /// If the file does not exist or is shorter than `offset`.
    pub fn corrupt(&self, path: &Path, offset: u64) {
        let mut st = self.lock();
        let Some(Entry::File(ino)) = st.live.get(path).copied() else {
            panic!("no such file {}", path.display())
        };
        let inode = &mut st.inodes[ino];
        inode.data[offset as usize] ^= 0x10;
        if (offset as usize) < inode.durable.len() {
            inode.durable[offset as usize] ^= 0x10;
        }
    }

    /// The current bytes of a file, if it exists.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.lock();
        match st.live.get(path) {
            Some(Entry::File(ino)) => Some(st.inodes[*ino].data.clone()),
            _ => None,
        }
    }
}

/// Whether `dir` is the root (or the empty path), which always exists.
fn is_root(dir: &Path) -> bool {
    dir.parent().is_none() || dir.as_os_str().is_empty()
}

/// Durable bytes, overlaid sector by sector with a random choice of the un-synced ones.
fn torn_image(inode: &Inode, rng: &mut XorShift) -> Vec<u8> {
    let (old, new) = (&inode.durable, &inode.data);
    let len = if old.len() == new.len() || rng.coin() {
        new.len()
    } else {
        old.len()
    };
    let mut image = vec![0u8; len];
    for start in (0..len).step_by(SECTOR) {
        let end = (start + SECTOR).min(len);
        let from_old = old.get(start..end.min(old.len())).unwrap_or(&[]);
        let from_new = new.get(start..end.min(new.len())).unwrap_or(&[]);
        let pick = if from_old == from_new || rng.coin() {
            from_new
        } else {
            from_old
        };
        image[start..start + pick.len()].copy_from_slice(pick);
    }
    image
}

struct SimFile {
    fs: SimIo,
    ino: usize,
}

impl IoFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let st = self.fs.lock();
        let data = &st.inodes[self.ino].data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.fs.lock();
        st.mutate()?;
        let end = offset as usize + buf.len();
        st.grow(self.ino, end)?;
        st.inodes[self.ino].data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.fs.lock();
        st.mutate()?;
        if std::mem::take(&mut st.fail_next_sync) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let inode = &mut st.inodes[self.ino];
        inode.durable = inode.data.clone();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.fs.lock().inodes[self.ino].data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.fs.lock();
        st.mutate()?;
        if len as usize > st.inodes[self.ino].data.len() {
            st.grow(self.ino, len as usize)
        } else {
            st.inodes[self.ino].data.truncate(len as usize);
            Ok(())
        }
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut st = self.fs.lock();
        st.mutate()?;
        st.grow(self.ino, len as usize)
    }
}

impl Io for SimIo {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
        let mut st = self.lock();
        let ino = match st.live.get(path).copied() {
            Some(Entry::File(ino)) => ino,
            Some(Entry::Dir) => return Err(io::Error::other("is a directory")),
            None if create => {
                let parent = path.parent().unwrap_or(Path::new(""));
                if !is_root(parent) && st.live.get(parent) != Some(&Entry::Dir) {
                    return Err(io::ErrorKind::NotFound.into());
                }
                st.mutate()?;
                st.inodes.push(Inode::default());
                let ino = st.inodes.len() - 1;
                st.live.insert(path.to_path_buf(), Entry::File(ino));
                ino
            }
            None => return Err(io::ErrorKind::NotFound.into()),
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        // A new directory's entry is durable once its parent is synced, as a file's is; the
        // root always is.
        let mut missing = Vec::new();
        for dir in path.ancestors() {
            if is_root(dir) {
                continue;
            }
            match st.live.get(dir) {
                Some(Entry::File(_)) => return Err(io::Error::other("not a directory")),
                Some(Entry::Dir) => break,
                None => missing.push(dir.to_path_buf()),
            }
        }
        for dir in missing.into_iter().rev() {
            st.mutate()?;
            st.live.insert(dir, Entry::Dir);
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        if !is_root(path) && st.live.get(path) != Some(&Entry::Dir) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(st
            .live
            .keys()
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        is_root(path) || self.lock().live.contains_key(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        match st.live.get(path) {
            Some(Entry::File(_)) => {
                st.mutate()?;
                st.live.remove(path);
                Ok(())
            }
            _ => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let Some(entry @ Entry::File(_)) = st.live.get(from).copied() else {
            return Err(io::ErrorKind::NotFound.into());
        };
        st.mutate()?;
        st.live.remove(from);
        st.live.insert(to.to_path_buf(), entry);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.mutate()?;
        let children: Vec<PathBuf> = st
            .live
            .keys()
            .chain(st.durable.keys())
            .filter(|p| p.parent() == Some(path))
            .cloned()
            .collect();
        for child in children {
            match st.live.get(&child).copied() {
                Some(entry) => st.durable.insert(child, entry),
                None => st.durable.remove(&child),
            };
        }
        Ok(())
    }

    fn lock_dir(&self, _path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        Ok(Box::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_synced(io: &SimIo, path: &Path) {
        let f = io.open(path, true).unwrap();
        f.write_all_at(b"kept", 0).unwrap();
        f.sync_data().unwrap();
    }

    #[test]
    fn a_new_directory_survives_a_crash_only_once_its_parent_was_synced() {
        let io = SimIo::new();
        let file = Path::new("/a/b/f");
        io.create_dir_all(Path::new("/a/b")).unwrap();
        write_synced(&io, file);
        io.sync_dir(Path::new("/a/b")).unwrap();
        // The file's entry is durable, but not the directories above it.
        assert!(!io.crash(1).exists(file));
        io.sync_dir(Path::new("/a")).unwrap();
        assert!(!io.crash(2).exists(file));
        io.sync_dir(Path::new("/")).unwrap();
        let image = io.crash(3);
        assert!(image.exists(file));
        assert_eq!(image.read_file(file).as_deref(), Some(&b"kept"[..]));
    }
}
