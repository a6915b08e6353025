//! The API-based DNS providers. Cloudflare cannot be reached from here: its provider is
//! tested against a local stand-in that follows Cloudflare's documented v4 API. The
//! httpreq provider calls a local webhook that writes into a real Knot server.

use std::sync::{Arc, Mutex};

use base64::Engine;
use lobe_tls::challenge::DnsProviderConfig;
use lobe_tls::challenge::dns01::{CloudflareProvider, DnsProvider, HttpreqProvider};
use lobe_tls_tests::cloudflare_api::CloudflareApi;
use lobe_tls_tests::dns::{DnsTestbed, ZONE};
use lobe_tls_tests::http_server::{HttpServer, Request, json_response};

const TOKEN: &str = "test-token-123";

#[tokio::test]
async fn cloudflare_writes_in_the_longest_matching_zone_and_deletes_only_its_own_record() {
    let api = CloudflareApi::start(TOKEN, &["example.com", "sub.example.com"]).await;
    api.insert_record(
        "sub.example.com",
        "_acme-challenge.www.sub.example.com",
        "someone-else",
        None,
    );
    let provider = CloudflareProvider::new(&api.url(), TOKEN).unwrap();
    let fqdn = "_acme-challenge.www.sub.example.com.";
    provider.present(fqdn, "ours").await.unwrap();
    let ours = api
        .records()
        .into_iter()
        .find(|r| r.content == "ours")
        .expect("record created");
    assert_eq!(ours.zone_id, api.zone_id("sub.example.com"));
    assert_eq!(ours.name, "_acme-challenge.www.sub.example.com");

    provider.cleanup(fqdn, "ours").await.unwrap();
    let left: Vec<String> = api.records().into_iter().map(|r| r.content).collect();
    assert_eq!(left, vec!["someone-else".to_owned()]);
    // A value we never created is not deleted either.
    provider.cleanup(fqdn, "someone-else").await.unwrap();
    assert_eq!(api.records().len(), 1);
}

#[tokio::test]
async fn cloudflare_adopts_its_own_leftover_but_not_a_foreign_identical_record() {
    let api = CloudflareApi::start(TOKEN, &["example.com"]).await;
    api.insert_record(
        "example.com",
        "_acme-challenge.a.example.com",
        "v-a",
        Some("lobe-tls ACME challenge"),
    );
    api.insert_record(
        "example.com",
        "_acme-challenge.b.example.com",
        "v-b",
        Some("managed by hand"),
    );
    let provider = CloudflareProvider::new(&api.url(), TOKEN).unwrap();
    provider
        .present("_acme-challenge.a.example.com.", "v-a")
        .await
        .unwrap();
    provider
        .present("_acme-challenge.b.example.com.", "v-b")
        .await
        .unwrap();
    provider
        .cleanup("_acme-challenge.a.example.com.", "v-a")
        .await
        .unwrap();
    provider
        .cleanup("_acme-challenge.b.example.com.", "v-b")
        .await
        .unwrap();
    let left: Vec<String> = api.records().into_iter().map(|r| r.content).collect();
    assert_eq!(left, vec!["v-b".to_owned()]);
}

#[tokio::test]
async fn cloudflare_retries_after_429_and_reports_a_persistent_rate_limit() {
    let api = CloudflareApi::start(TOKEN, &["example.com"]).await;
    let provider = CloudflareProvider::new(&api.url(), TOKEN).unwrap();
    api.rate_limit_next(1);
    provider
        .present("_acme-challenge.example.com.", "after-429")
        .await
        .unwrap();
    assert_eq!(api.records().len(), 1);

    api.rate_limit_next(100);
    let err = provider
        .present("_acme-challenge.example.com.", "blocked")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("rate limit") && err.contains("429"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[tokio::test]
async fn cloudflare_bad_token_and_unknown_zone_give_clear_errors() {
    let api = CloudflareApi::start(TOKEN, &["example.com"]).await;
    let wrong = CloudflareProvider::new(&api.url(), "wrong-token").unwrap();
    let err = wrong
        .present("_acme-challenge.example.com.", "v")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CLOUDFLARE_API_TOKEN") && err.contains("Authentication error"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-token"),
        "the token must not show in errors: {err}"
    );

    let provider = CloudflareProvider::new(&api.url(), TOKEN).unwrap();
    let err = provider
        .present("_acme-challenge.example.org.", "v")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no Cloudflare zone holds _acme-challenge.example.org"),
        "{err}"
    );
}

/// A lego-style httpreq webhook that writes into Knot through the rfc2136 provider.
async fn knot_webhook(dns: &DnsTestbed, seen: Arc<Mutex<Vec<serde_json::Value>>>) -> HttpServer {
    let writer = Arc::new(dns.rfc2136_provider());
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("hook-user:hook-pass")
    );
    HttpServer::start(move |req: Request| {
        let writer = writer.clone();
        let seen = seen.clone();
        let expected_auth = expected_auth.clone();
        async move {
            let auth = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if auth != Some(expected_auth.as_str()) {
                return json_response(401, serde_json::json!({"error": "unauthorized"}));
            }
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
                return json_response(400, serde_json::json!({"error": "bad json"}));
            };
            seen.lock().unwrap().push(body.clone());
            let (fqdn, value) = (
                body["fqdn"].as_str().unwrap_or(""),
                body["value"].as_str().unwrap_or(""),
            );
            let result = match req.path_and_query.as_str() {
                "/hook/present" => writer.present(fqdn, value).await,
                "/hook/cleanup" => writer.cleanup(fqdn, value).await,
                _ => return json_response(404, serde_json::json!({})),
            };
            match result {
                Ok(()) => json_response(200, serde_json::json!({})),
                Err(e) => json_response(500, serde_json::json!({"error": e.to_string()})),
            }
        }
    })
    .await
}

#[tokio::test]
async fn httpreq_posts_lego_json_with_basic_auth_and_the_webhook_writes_into_knot() {
    let dns = DnsTestbed::start();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = knot_webhook(&dns, seen.clone()).await;
    let provider = HttpreqProvider::new(
        &format!("{}/hook/", hook.url()),
        Some(("hook-user".into(), "hook-pass".into())),
    )
    .unwrap();
    let fqdn = format!("_acme-challenge.hook.{ZONE}.");
    provider.present(&fqdn, "via-webhook").await.unwrap();
    assert_eq!(dns.authoritative_txt(&fqdn), vec!["via-webhook".to_owned()]);
    provider.cleanup(&fqdn, "via-webhook").await.unwrap();
    assert!(dns.authoritative_txt(&fqdn).is_empty());
    assert_eq!(
        seen.lock().unwrap()[0],
        serde_json::json!({"fqdn": fqdn, "value": "via-webhook"})
    );
}

#[tokio::test]
async fn httpreq_wrong_password_names_the_setting_to_fix() {
    let dns = DnsTestbed::start();
    let hook = knot_webhook(&dns, Arc::default()).await;
    let provider = HttpreqProvider::new(
        &format!("{}/hook", hook.url()),
        Some(("hook-user".into(), "not-the-password".into())),
    )
    .unwrap();
    let err = provider
        .present(&format!("_acme-challenge.hook.{ZONE}."), "v")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("401") && err.contains("LOBE_TLS_HTTPREQ_PASSWORD"),
        "{err}"
    );
    assert!(!err.contains("not-the-password"), "{err}");
}

#[tokio::test]
async fn cloudflare_settings_come_from_the_config_file() {
    let api = CloudflareApi::start(TOKEN, &["example.com"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dns.toml");
    std::fs::write(
        &file,
        format!(
            "[cloudflare]\napi_token = \"{TOKEN}\"\napi_url = \"{}\"\n",
            api.url()
        ),
    )
    .unwrap();
    let provider = DnsProviderConfig::Cloudflare {
        config_file: Some(file),
    }
    .build()
    .unwrap();
    provider
        .present("_acme-challenge.example.com.", "from-file")
        .await
        .unwrap();
    assert_eq!(api.records()[0].content, "from-file");
    provider
        .cleanup("_acme-challenge.example.com.", "from-file")
        .await
        .unwrap();
    assert!(api.records().is_empty());
}

#[tokio::test]
async fn provider_config_file_errors_name_the_missing_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dns.toml");
    std::fs::write(&file, "[httpreq]\nusername = \"only-user\"\n").unwrap();
    let err = DnsProviderConfig::Httpreq {
        config_file: Some(file.clone()),
    }
    .build()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("LOBE_TLS_HTTPREQ_ENDPOINT") && err.contains("`endpoint` under [httpreq]"),
        "{err}"
    );

    std::fs::write(&file, "[rfc2136\n").unwrap();
    let err = DnsProviderConfig::Rfc2136 {
        config_file: Some(file.clone()),
    }
    .build()
    .unwrap_err()
    .to_string();
    assert!(err.contains("not valid TOML"), "{err}");
}
