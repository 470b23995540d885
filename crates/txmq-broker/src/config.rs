//! Broker configuration: defaults, then a TOML file, then `TXMQ_*` environment variables,
//! then command-line flags (applied by the binary).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything `txmq serve` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Data directory (`TXMQ_DATA_DIR`).
    pub data_dir: PathBuf,
    /// gRPC address, plaintext and TLS on one port (`TXMQ_LISTEN`).
    pub listen: String,
    /// Admin HTTP address (`TXMQ_HTTP`).
    pub http: String,
    /// PEM certificate chain for TLS; a self-signed one is made when unset.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
    /// Create unknown topics on first send (`TXMQ_AUTO_CREATE_TOPICS`); handy in development.
    pub auto_create_topics: bool,
    /// Queues of auto-created topics.
    pub default_queues: u32,
    /// Largest message body accepted, in bytes (default 4 MiB).
    pub max_body_size: usize,
    /// `sync` (acknowledge after fdatasync, the default) or `async`.
    pub durability: String,
    /// With `async` durability: fdatasync interval in milliseconds.
    pub async_flush_ms: u64,
    /// Commit-log segment size in bytes.
    pub segment_size: u64,
    /// Delete log segments older than this many hours.
    pub retention_hours: u64,
    /// First check-back of an open transaction after this many milliseconds (default 6 s),
    /// unless the message sets its own orphaned-transaction recovery duration.
    pub transaction_timeout_ms: u64,
    /// Check-backs actually sent before a transaction is declared unresolved (default 15).
    pub transaction_check_max: u32,
    /// Delay between check-backs, doubling from this (default 6 s) up to 5 minutes.
    pub transaction_check_interval_ms: u64,
    /// Check-backs a producer's stream is sent at a time, each open until its transaction
    /// is decided or its interval passes (default 8); more wait, uncounted.
    pub transaction_checks_per_producer: u32,
    /// Delivery attempts of a consumer group before dead-lettering (default 16).
    pub default_max_attempts: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./txmq-data"),
            listen: "127.0.0.1:8081".into(),
            http: "127.0.0.1:8080".into(),
            tls_cert: None,
            tls_key: None,
            auto_create_topics: true,
            default_queues: 8,
            max_body_size: 4 << 20,
            durability: "sync".into(),
            async_flush_ms: 100,
            segment_size: 1 << 30,
            retention_hours: 72,
            transaction_timeout_ms: 6_000,
            transaction_check_max: 15,
            transaction_check_interval_ms: 6_000,
            transaction_checks_per_producer: 8,
            default_max_attempts: 16,
        }
    }
}

impl BrokerConfig {
    /// Parses a TOML configuration; unknown keys are errors.
    ///
    /// # Errors
    /// A message naming the bad key or value.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let c: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    /// Applies `TXMQ_*` variables (upper-case field names) from `vars`.
    ///
    /// # Errors
    /// A message naming the variable whose value does not parse.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), String> {
        for (key, value) in vars {
            let Some(field) = key.strip_prefix("TXMQ_") else {
                continue;
            };
            let bad = |e: &dyn std::fmt::Display| format!("{key}={value:?}: {e}");
            match field {
                "DATA_DIR" => self.data_dir = value.into(),
                "LISTEN" => self.listen = value,
                "HTTP" => self.http = value,
                "TLS_CERT" => self.tls_cert = Some(value.into()),
                "TLS_KEY" => self.tls_key = Some(value.into()),
                "AUTO_CREATE_TOPICS" => {
                    self.auto_create_topics = value.parse().map_err(|e| bad(&e))?
                }
                "DEFAULT_QUEUES" => self.default_queues = value.parse().map_err(|e| bad(&e))?,
                "MAX_BODY_SIZE" => self.max_body_size = value.parse().map_err(|e| bad(&e))?,
                "DURABILITY" => self.durability = value,
                "ASYNC_FLUSH_MS" => self.async_flush_ms = value.parse().map_err(|e| bad(&e))?,
                "SEGMENT_SIZE" => self.segment_size = value.parse().map_err(|e| bad(&e))?,
                "RETENTION_HOURS" => self.retention_hours = value.parse().map_err(|e| bad(&e))?,
                "TRANSACTION_TIMEOUT_MS" => {
                    self.transaction_timeout_ms = value.parse().map_err(|e| bad(&e))?
                }
                "TRANSACTION_CHECK_MAX" => {
                    self.transaction_check_max = value.parse().map_err(|e| bad(&e))?
                }
                "TRANSACTION_CHECK_INTERVAL_MS" => {
                    self.transaction_check_interval_ms = value.parse().map_err(|e| bad(&e))?
                }
                "TRANSACTION_CHECKS_PER_PRODUCER" => {
                    self.transaction_checks_per_producer = value.parse().map_err(|e| bad(&e))?
                }
                "DEFAULT_MAX_ATTEMPTS" => {
                    self.default_max_attempts = value.parse().map_err(|e| bad(&e))?
                }
                // Variables the broker does not own (TXMQ_LOG, ...) are left alone.
                _ => {}
            }
        }
        self.validate()
    }

    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.durability.as_str(), "sync" | "async") {
            return Err(format!(
                "durability must be \"sync\" or \"async\", not {:?}",
                self.durability
            ));
        }
        if self.default_queues == 0 || self.default_queues > 1024 {
            return Err("default_queues must be 1 to 1024".into());
        }
        if self.max_body_size == 0 || self.max_body_size > 64 << 20 {
            return Err("max_body_size must be 1 byte to 64 MiB".into());
        }
        if self.default_max_attempts == 0 {
            return Err("default_max_attempts must be at least 1".into());
        }
        if self.retention_hours == 0 {
            return Err("retention_hours must be at least 1".into());
        }
        if self.transaction_check_max == 0 {
            return Err("transaction_check_max must be at least 1".into());
        }
        if self.transaction_checks_per_producer == 0 {
            return Err("transaction_checks_per_producer must be at least 1".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key must be set together".into());
        }
        Ok(())
    }

    /// The storage engine's configuration.
    pub fn store_config(&self) -> txmq_store::StoreConfig {
        let mut c = txmq_store::StoreConfig::new(self.data_dir.join("store"));
        c.segment_size = self.segment_size;
        c.max_record_size = (self.max_body_size + (1 << 20)).min((self.segment_size / 2) as usize);
        c.retention.max_age = Some(std::time::Duration::from_secs(
            self.retention_hours.saturating_mul(3600),
        ));
        if self.durability == "async" {
            c.durability = txmq_store::Durability::Async {
                interval: std::time::Duration::from_millis(self.async_flush_ms.max(1)),
                max_unsynced_bytes: 64 << 20,
            };
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c =
            BrokerConfig::from_toml("listen = \"127.0.0.1:9999\"\ndefault_queues = 4\n").unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999");
        assert_eq!(c.default_queues, 4);
        assert_eq!(c.http, "127.0.0.1:8080");
        let err = BrokerConfig::from_toml("lisen = \"x\"").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn environment_variables_override_and_bad_values_are_named() {
        let mut c = BrokerConfig::default();
        c.apply_env([("TXMQ_HTTP".to_string(), "127.0.0.1:1".to_string())])
            .unwrap();
        assert_eq!(c.http, "127.0.0.1:1");
        let err = c
            .apply_env([("TXMQ_DEFAULT_QUEUES".to_string(), "many".to_string())])
            .unwrap_err();
        assert!(err.contains("TXMQ_DEFAULT_QUEUES"), "{err}");
    }
}
