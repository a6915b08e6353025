//! Header bombs, over HTTP/1.1 (attacks/slow_attack.py) and h2 (attacks/h2_attack.py):
//! 10,000 headers, and one header of 1 MiB. Each is answered 431 or its connection closed,
//! ten times over, without memory growth.

use std::time::Duration;

use crate::support::{Serve, assert_legit_unharmed, exclusive, measure, run_python, script_args};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_bombs_are_refused_without_growth() {
    let _cpu = exclusive();
    let serve = Serve::start(&[]).await;
    let rows = [
        ("slow_attack.py", "header-bomb-many"),
        ("slow_attack.py", "header-bomb-large"),
        ("h2_attack.py", "header-bomb-many"),
        ("h2_attack.py", "header-bomb-large"),
    ];
    let m = measure(&serve, async {
        let mut results = Vec::new();
        for (script, attack) in rows {
            for _ in 0..10 {
                let mut args = vec![attack.to_owned()];
                args.extend(script_args(&serve, &[]));
                results.push(run_python(script, &args, Duration::from_secs(30)).await);
            }
        }
        serde_json::Value::Array(results)
    })
    .await;
    m.print("header bombs");
    for result in m.result.as_array().unwrap() {
        let refused = match result["status"].as_str() {
            // HTTP/1.1: the status line, if any came before the close.
            Some(line) => line.is_empty() || line.contains(" 431 "),
            // h2: a GOAWAY, a RST_STREAM or a close; an answer only if it is 431.
            None => {
                result["closed"] == true
                    || !result["goaway"].is_null()
                    || result["rst_received"].as_u64().unwrap_or(0) > 0
            }
        };
        assert!(refused, "header bomb served: {result}");
    }
    assert_legit_unharmed(&m);
    assert!(
        m.rss_growth_kib() < 16 * 1024,
        "rss grew {} KiB",
        m.rss_growth_kib()
    );
}
