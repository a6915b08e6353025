//! A local stand-in for Cloudflare's v4 API, following its documentation: the
//! `{success, errors, messages, result}` envelope, bearer-token authentication,
//! `GET /zones?name=`, `POST/GET /zones/{id}/dns_records`,
//! `DELETE /zones/{id}/dns_records/{id}`, error 81058 for an identical record, 81044
//! for a missing one, and HTTP 429 with `Retry-After` when rate limited.
//!
//! Cloudflare itself cannot be reached from the test machines.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::http_server::{HttpServer, Request, json_response};

/// One DNS record held by the stand-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// The zone's id.
    pub zone_id: String,
    /// The record's name, without trailing dot.
    pub name: String,
    /// The TXT content.
    pub content: String,
    /// The record's comment.
    pub comment: Option<String>,
}

#[derive(Default)]
struct State {
    zones: Vec<(String, String)>,
    records: BTreeMap<String, StoredRecord>,
    rate_limited: usize,
    next_id: u64,
    requests: Vec<String>,
}

/// The running stand-in.
pub struct CloudflareApi {
    server: HttpServer,
    state: Arc<Mutex<State>>,
}

fn error(status: u16, code: u64, message: &str) -> http::Response<String> {
    json_response(
        status,
        json!({"success": false, "errors": [{"code": code, "message": message}], "messages": [], "result": null}),
    )
}

fn ok(result: Value) -> http::Response<String> {
    json_response(
        200,
        json!({"success": true, "errors": [], "messages": [], "result": result}),
    )
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

fn record_json(id: &str, r: &StoredRecord) -> Value {
    json!({"id": id, "zone_id": r.zone_id, "type": "TXT", "name": r.name,
           "content": r.content, "ttl": 120, "comment": r.comment})
}

fn handle(state: &Mutex<State>, token: &str, req: Request) -> http::Response<String> {
    let mut state = state.lock().expect("state");
    state
        .requests
        .push(format!("{} {}", req.method, req.path_and_query));
    let authorized = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {token}"));
    if !authorized {
        return error(403, 10000, "Authentication error");
    }
    if state.rate_limited > 0 {
        state.rate_limited -= 1;
        let mut response = error(
            429,
            971,
            "Please wait and consider throttling your request speed",
        );
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("0"),
        );
        return response;
    }
    let Some(rest) = req.path_and_query.strip_prefix("/client/v4") else {
        return error(404, 7003, "No route for the URI");
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["zones"]) => {
            let name = query_param(query, "name");
            let zones: Vec<Value> = state
                .zones
                .iter()
                .filter(|(_, z)| name.as_deref().is_none_or(|n| n == z))
                .map(|(id, z)| json!({"id": id, "name": z, "status": "active"}))
                .collect();
            ok(Value::Array(zones))
        }
        ("POST", ["zones", zone_id, "dns_records"]) => {
            if !state.zones.iter().any(|(id, _)| id == zone_id) {
                return error(
                    404,
                    7003,
                    "Could not route to /zones, perhaps your object identifier is invalid?",
                );
            }
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return error(400, 9207, "Request body is invalid.");
            };
            let (Some("TXT"), Some(name), Some(content)) = (
                body["type"].as_str(),
                body["name"].as_str(),
                body["content"].as_str(),
            ) else {
                return error(400, 9000, "DNS name, type and content are required");
            };
            let record = StoredRecord {
                zone_id: zone_id.to_string(),
                name: name.to_owned(),
                content: content.to_owned(),
                comment: body["comment"].as_str().map(str::to_owned),
            };
            let identical = state.records.values().any(|r| {
                r.zone_id == record.zone_id && r.name == record.name && r.content == record.content
            });
            if identical {
                return error(400, 81058, "An identical record already exists.");
            }
            state.next_id += 1;
            let id = format!("{:032x}", state.next_id);
            let out = record_json(&id, &record);
            state.records.insert(id, record);
            ok(out)
        }
        ("GET", ["zones", zone_id, "dns_records"]) => {
            let name = query_param(query, "name");
            let rtype = query_param(query, "type");
            let list: Vec<Value> = state
                .records
                .iter()
                .filter(|(_, r)| r.zone_id == *zone_id)
                .filter(|(_, r)| name.as_deref().is_none_or(|n| n == r.name))
                .filter(|_| rtype.as_deref().is_none_or(|t| t == "TXT"))
                .map(|(id, r)| record_json(id, r))
                .collect();
            ok(Value::Array(list))
        }
        ("DELETE", ["zones", zone_id, "dns_records", record_id]) => {
            match state.records.get(*record_id) {
                Some(r) if r.zone_id == *zone_id => {
                    state.records.remove(*record_id);
                    ok(json!({"id": record_id}))
                }
                _ => error(404, 81044, "Record does not exist."),
            }
        }
        _ => error(404, 7003, "No route for the URI"),
    }
}

impl CloudflareApi {
    /// Starts the stand-in, accepting `token`, with these zones (ids are made up).
    pub async fn start(token: &str, zones: &[&str]) -> CloudflareApi {
        let state = Arc::new(Mutex::new(State {
            zones: zones
                .iter()
                .enumerate()
                .map(|(i, z)| (format!("zone{i:028x}"), (*z).to_owned()))
                .collect(),
            ..State::default()
        }));
        let token = token.to_owned();
        let handler_state = state.clone();
        let server = HttpServer::start(move |req| {
            let response = handle(&handler_state, &token, req);
            async move { response }
        })
        .await;
        CloudflareApi { server, state }
    }

    /// The API base URL, like `https://api.cloudflare.com/client/v4`.
    pub fn url(&self) -> String {
        format!("{}/client/v4", self.server.url())
    }

    /// The records held now.
    pub fn records(&self) -> Vec<StoredRecord> {
        self.state
            .lock()
            .expect("state")
            .records
            .values()
            .cloned()
            .collect()
    }

    /// The id of zone `name`.
    pub fn zone_id(&self, name: &str) -> String {
        let state = self.state.lock().expect("state");
        state
            .zones
            .iter()
            .find(|(_, z)| z == name)
            .map(|(id, _)| id.clone())
            .expect("no such zone")
    }

    /// Adds a record as if someone else (or an earlier run) had made it.
    pub fn insert_record(&self, zone: &str, name: &str, content: &str, comment: Option<&str>) {
        let zone_id = self.zone_id(zone);
        let mut state = self.state.lock().expect("state");
        state.next_id += 1;
        let id = format!("{:032x}", state.next_id);
        state.records.insert(
            id,
            StoredRecord {
                zone_id,
                name: name.to_owned(),
                content: content.to_owned(),
                comment: comment.map(str::to_owned),
            },
        );
    }

    /// Answers the next `n` requests with HTTP 429.
    pub fn rate_limit_next(&self, n: usize) {
        self.state.lock().expect("state").rate_limited = n;
    }

    /// The requests received so far, as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("state").requests.clone()
    }
}
