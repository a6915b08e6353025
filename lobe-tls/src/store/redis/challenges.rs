//! Challenge responses, shared by every instance so that any of them can answer the CA.

use std::time::Duration;

use ::redis::AsyncCommands;
use async_trait::async_trait;

use super::{RedisStore, millis};
use crate::error::Result;
use crate::store::ChallengeStore;

/// Challenge responses under `<prefix>:challenge:<key>`, with a TTL, announced on the
/// events channel.
#[async_trait]
impl ChallengeStore for RedisStore {
    async fn put_challenge(&self, key: &str, value: &str, ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        ::redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key("challenge", key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl).max(1))
            .ignore()
            .publish(self.channel(), format!("challenge-put {key}"))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("publish challenge {key}"), &e))
    }

    async fn get_challenge(&self, key: &str) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        conn.get(self.key("challenge", key))
            .await
            .map_err(|e| self.error(&format!("look up challenge {key}"), &e))
    }

    async fn delete_challenge(&self, key: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        ::redis::pipe()
            .atomic()
            .del(self.key("challenge", key))
            .ignore()
            .publish(self.channel(), format!("challenge-del {key}"))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("remove challenge {key}"), &e))
    }

    async fn list_challenges(&self, prefix: &str) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let key_prefix = self.key("challenge", "");
        let pattern = format!("{key_prefix}{}*", escape_glob(prefix));
        let mut iter = conn
            .scan_match::<_, String>(pattern)
            .await
            .map_err(|e| self.error("list challenges", &e))?;
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            let key = key.map_err(|e| self.error("list challenges", &e))?;
            if let Some(k) = key.strip_prefix(&key_prefix) {
                keys.push(k.to_owned());
            }
        }
        keys.sort();
        Ok(keys)
    }
}

/// Escapes Redis glob characters so a prefix matches literally.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
