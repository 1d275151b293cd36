//! The dashboard in headless Chromium: server-rendered, hydrated, refreshing itself.

use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (apt-get install chromium-driver)");
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let webdriver = format!("http://127.0.0.1:{port}");
        let client = wait_for("chromedriver", Duration::from_secs(20), || {
            let caps = caps.clone();
            let webdriver = webdriver.clone();
            async move {
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&webdriver)
                    .await
                    .ok()
            }
        })
        .await;
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn text_of(&self, css: &str) -> Option<String> {
        let el = self.client.find(Locator::Css(css)).await.ok()?;
        el.text().await.ok()
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn require_front_end() {
    let wasm = workspace_root().join("target/site/pkg/frontend_bg.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: build the front end first (scripts/build-frontend.sh)",
        wasm.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_shows_new_reports_live_and_markup_as_text() {
    require_front_end();
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let browser = Browser::start().await;
    browser.client.goto(&srv.base).await.unwrap();
    wait_for("hydration", Duration::from_secs(20), || async {
        browser
            .client
            .find(Locator::Css(".page[data-hydrated='true']"))
            .await
            .ok()
    })
    .await;
    let empty = browser.text_of(".empty").await.unwrap_or_default();
    assert!(empty.contains("No VM has reported yet"), "{empty}");

    // A report appears within 5 s, without a reload.
    let (status, body) = srv.report(&report_for("live-vm-01")).await;
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the new VM on the dashboard",
        Duration::from_secs(5),
        || async {
            let text = browser.text_of("table.vms").await?;
            text.contains("live-vm-01").then_some(())
        },
    )
    .await;
    assert_eq!(
        browser
            .text_of("[data-count='healthy'] .value")
            .await
            .as_deref(),
        Some("1")
    );

    // A hostname holding markup (stored before validation existed, say) shows as text.
    let markup = "<b id=\"injected\">bold</b><img src=x onerror=\"window.pwned=1\">";
    let stored = {
        let state = srv.state();
        let mut report = domain::heartbeat::parse_report(
            report_for("placeholder").to_string().as_bytes(),
            server::now_ms(),
        )
        .unwrap()
        .heartbeat;
        report.hostname = markup.to_owned();
        let stored = server::ingest::write_batch(
            &state.db,
            &[server::ingest::Submission::fleet(report)],
            &state.status_config.get(),
        )
        .await
        .unwrap();
        let vm_id = stored[0].as_ref().unwrap().vm_id;
        server::cache::refresh(&state.db, &state.cache, &[vm_id]).await;
        vm_id
    };
    let row = format!("tr[data-vm-id='{}'] .hostname", stored);
    let shown = wait_for("the markup VM", Duration::from_secs(5), || async {
        browser.text_of(&row).await
    })
    .await;
    assert_eq!(shown, markup);
    assert!(
        browser
            .client
            .find(Locator::Css("#injected"))
            .await
            .is_err()
    );
    let pwned = browser
        .client
        .execute("return window.pwned === undefined", vec![])
        .await
        .unwrap();
    assert_eq!(pwned, json!(true));
    browser.close().await;
    srv.stop().await;
}
