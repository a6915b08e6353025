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
        let mut writes = ::redis::pipe();
        writes
            .atomic()
            .cmd("SET")
            .arg(self.keys.challenge(key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl).max(1))
            .ignore();
        self.write_and_announce(
            writes,
            format!("challenge-put {key}"),
            &format!("publish challenge {key}"),
        )
        .await
    }

    async fn get_challenge(&self, key: &str) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        conn.get(self.keys.challenge(key))
            .await
            .map_err(|e| self.error(&format!("look up challenge {key}"), &e))
    }

    async fn delete_challenge(&self, key: &str) -> Result<()> {
        let mut writes = ::redis::pipe();
        writes.atomic().del(self.keys.challenge(key)).ignore();
        self.write_and_announce(
            writes,
            format!("challenge-del {key}"),
            &format!("remove challenge {key}"),
        )
        .await
    }

    async fn list_challenges(&self, prefix: &str) -> Result<Vec<String>> {
        self.scan_names_from("challenge", prefix).await
    }
}
