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

    async fn fill(&self, name: &str, value: &str) {
        let field = self
            .client
            .find(Locator::Css(&format!("input[name='{name}']")))
            .await
            .unwrap();
        field.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    /// Signs in through the sign-in page and waits for the hydrated fleet page.
    async fn sign_in(&self, base: &str, username: &str, password: &str) {
        self.client.goto(&format!("{base}/")).await.unwrap();
        assert_eq!(
            self.path().await,
            "/login",
            "anonymous pages lead to the sign-in page"
        );
        self.fill("username", username).await;
        self.fill("password", password).await;
        self.click("form.auth button[type='submit']").await;
        self.hydrated().await;
    }

    /// Waits for the page to be hydrated and its first data on screen: a page can hydrate
    /// while its streamed data still stands behind the "Loading..." placeholder.
    async fn hydrated(&self) {
        wait_for("hydration", Duration::from_secs(20), || async {
            self.client
                .find(Locator::Css(".page[data-hydrated='true']"))
                .await
                .ok()?;
            let loading = self.client.find(Locator::Css(".loading")).await.is_ok();
            (!loading).then_some(())
        })
        .await;
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
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ],
    )
    .await;
    let browser = Browser::start().await;
    browser
        .sign_in(&srv.base, "admin", "correct horse battery")
        .await;
    wait_for(
        "the empty fleet's message",
        Duration::from_secs(10),
        || async {
            let empty = browser.text_of(".empty").await?;
            empty.contains("No VM has reported yet").then_some(())
        },
    )
    .await;

    // Pushed, not polled: once the page follows the event stream it polls only every 30 s,
    // so each new VM showing within the deadline came through the push. The times are the
    // figure BENCHMARKS.md quotes (a heartbeat visible within 1 s).
    browser.live_mode("push").await;
    let mut shown_after = Vec::new();
    for n in 1..=5 {
        let host = format!("live-vm-{n:02}");
        let sent = std::time::Instant::now();
        let (status, body) = srv.report(&report_for(&host)).await;
        assert_eq!(status, 200, "{body}");
        wait_for(
            "the new VM on the dashboard",
            Duration::from_secs(5),
            || async {
                let text = browser.text_of("table.vms").await?;
                text.contains(&host).then_some(())
            },
        )
        .await;
        shown_after.push(sent.elapsed().as_millis());
    }
    shown_after.sort_unstable();
    println!("live push: report to row on screen, ms (sorted): {shown_after:?}");
    // The count comes in the same snapshot as the rows: it should already say 5.
    wait_for(
        "five healthy in the summary",
        Duration::from_secs(5),
        || async {
            let healthy = browser.text_of("[data-count='healthy'] .value").await?;
            (healthy == "5").then_some(())
        },
    )
    .await;

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

/// First start in a browser: the setup page with the code from `data/setup-code`, then an
/// operator signs in and resets a VM with the two-click button; the reset reaches Proxmox
/// and the audit log names the operator. A viewer sees no reset button.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setup_sign_in_and_an_operators_reset() {
    use crate::fake_pve::{FakePve, FakeVm};
    require_front_end();
    let fake = FakePve::start(vec![FakeVm::running(101, "pve1")]).await;
    let mut srv = crate::proxmox::start(Backend::Sqlite, &fake, &[]).await;
    let code = std::fs::read_to_string(srv.db.dir.path().join("setup-code")).unwrap();
    let browser = Browser::start().await;

    browser.client.goto(&srv.base).await.unwrap();
    assert_eq!(
        browser.path().await,
        "/setup",
        "with no user, pages lead to setup"
    );
    browser.fill("setup_code", "wrong-code").await;
    browser.fill("username", "root").await;
    browser.fill("password", "correct horse battery").await;
    browser.click("form.auth button[type='submit']").await;
    let error = wait_for(
        "the wrong-code message",
        Duration::from_secs(10),
        || async { browser.text_of(".error").await },
    )
    .await;
    assert!(error.contains("setup code"), "{error}");
    browser.fill("setup_code", code.trim()).await;
    browser.fill("username", "root").await;
    browser.fill("password", "correct horse battery").await;
    browser.click("form.auth button[type='submit']").await;
    browser.hydrated().await;
    assert_eq!(
        browser.text_of(".user .username").await.as_deref(),
        Some("root")
    );
    assert!(
        !srv.db.dir.path().join("setup-code").exists(),
        "the used setup code was kept"
    );

    // The admin (over the API) makes an operator and a viewer; a VM on guest 101 reports.
    for (name, role) in [("olga", "operator"), ("victor", "viewer")] {
        let (status, body) = srv
            .send(
                reqwest::Method::POST,
                "/api/users",
                Some(ADMIN_TOKEN),
                Some(json!({"username": name, "password": "operator password", "role": role})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let vm = crate::proxmox::report_vm(&srv, 101, "pve1", 100).await;
    crate::people::opt_out(&srv, vm).await;

    // Sign out, then the viewer: the fleet, but no reset button.
    browser.click("form.signout button").await;
    wait_for("the sign-in page", Duration::from_secs(10), || async {
        (browser.path().await == "/login").then_some(())
    })
    .await;
    browser
        .sign_in(&srv.base, "victor", "operator password")
        .await;
    let row = format!("tr[data-vm-id='{vm}']");
    wait_for("the VM row", Duration::from_secs(10), || async {
        browser.text_of(&row).await
    })
    .await;
    assert!(
        browser
            .client
            .find(Locator::Css(&format!("{row} button.reset")))
            .await
            .is_err(),
        "a viewer is offered a reset"
    );
    browser.click("form.signout button").await;
    wait_for("the sign-in page", Duration::from_secs(10), || async {
        (browser.path().await == "/login").then_some(())
    })
    .await;

    // The operator resets in two clicks.
    browser
        .sign_in(&srv.base, "olga", "operator password")
        .await;
    let button = format!("{row} button.reset");
    wait_for("the reset button", Duration::from_secs(10), || async {
        browser.text_of(&button).await
    })
    .await;
    browser.click(&button).await;
    assert_eq!(
        browser.text_of(&button).await.as_deref(),
        Some("Confirm reset")
    );
    assert!(fake.posts().is_empty(), "one click sent a reset");
    browser.click(&button).await;
    let said = wait_for("the reset to be sent", Duration::from_secs(10), || async {
        browser
            .text_of(&format!("{row} button.reset + .action-result"))
            .await
            .filter(|t| !t.is_empty())
    })
    .await;
    assert_eq!(said, "reset sent");
    wait_for("the POST to Proxmox", Duration::from_secs(10), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    let (_, history) = srv.get(&format!("/api/vms/{vm}/reset-history")).await;
    assert_eq!(history[0]["requested_by"], "olga", "{history}");
    let (_, audit) = srv.get("/api/audit").await;
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "reset")
        .cloned()
        .unwrap();
    assert_eq!(
        (
            entry["actor"].clone(),
            entry["outcome"].clone(),
            entry["target"].clone()
        ),
        (json!("olga"), json!("accepted"), json!(format!("vm {vm}"))),
        "{audit}"
    );
    browser.close().await;
    srv.stop().await;
}

/// The veto window on the fleet page: a hung VM's announced reboot shows a countdown, and
/// an operator's Hold keeps it from Proxmox and lands in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_announced_action_is_held_from_the_fleet_page() {
    use crate::fake_pve::{FakePve, FakeVm};
    require_front_end();
    let fake = FakePve::start(vec![FakeVm::running(101, "pve1")]).await;
    let mut srv = crate::proxmox::start(
        Backend::Sqlite,
        &fake,
        &[
            ("RESET_VETO_SECONDS", "120"),
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ],
    )
    .await;
    let browser = Browser::start().await;
    browser
        .sign_in(&srv.base, "admin", "correct horse battery")
        .await;
    let vm = crate::proxmox::report_vm(&srv, 101, "pve1", 100).await;
    let row = format!("tr[data-vm-id='{vm}']");
    let countdown = wait_for("the countdown", Duration::from_secs(20), || async {
        browser
            .text_of(&format!("{row} .countdown"))
            .await
            .filter(|t| t.starts_with("action in"))
    })
    .await;
    assert!(
        countdown.contains('m') || countdown.contains('s'),
        "{countdown}"
    );
    assert!(fake.posts().is_empty());
    browser.click(&format!("{row} button.hold")).await;
    let said = wait_for("the hold", Duration::from_secs(10), || async {
        browser
            .text_of(&format!("{row} .action-result"))
            .await
            .filter(|t| !t.is_empty())
    })
    .await;
    assert_eq!(said, "held");
    let (_, v) = srv.get(&format!("/api/vms/{vm}")).await;
    assert_eq!(v["remediation_phase"], "manual", "{v}");
    crate::proxmox::wait_rounds(&srv, 10).await;
    assert!(fake.posts().is_empty(), "{:?}", fake.posts());
    let (_, audit) = srv.get("/api/audit").await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "hold" && e["actor"] == "admin" && e["outcome"] == "held"),
        "{audit}"
    );
    browser.close().await;
    srv.stop().await;
}

impl Browser {
    /// Waits until the page says where its updates come from (`push` or `poll`).
    async fn live_mode(&self, mode: &str) {
        wait_for(
            &format!("the page on {mode}"),
            Duration::from_secs(20),
            || async { self.attr(".live", "data-live").await.filter(|m| m == mode) },
        )
        .await;
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let el = self.client.find(Locator::Css(css)).await.ok()?;
        el.attr(name).await.ok().flatten()
    }

    /// Saves a screenshot under target/screenshots (kept out of git) at `width` px.
    async fn screenshot(&self, name: &str, width: u32) {
        self.client.set_window_size(width, 900).await.unwrap();
        let png = self.client.screenshot().await.unwrap();
        let dir = workspace_root().join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}-{width}.png")), png).unwrap();
    }

    /// The elements that stick out to the right at the current width (empty: the page
    /// does not scroll sideways).
    async fn sticking_out(&self) -> Vec<String> {
        let found = self
            .client
            .execute(
                "const w = document.documentElement.clientWidth; \
                 if (document.documentElement.scrollWidth <= w) return []; \
                 return [...document.querySelectorAll('body *')] \
                   .filter(e => e.getBoundingClientRect().right > w + 0.5) \
                   .map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));",
                vec![],
            )
            .await
            .unwrap();
        serde_json::from_value(found).unwrap()
    }
}

/// A VM's page: a day with a known shape (a ramp, two silent hours, one spike) charted with
/// the spike where it was and the silence as a gap; longer ranges read the hour rollups; an
/// operator's reset asks first, naming the VM and its node, reaches Proxmox once and shows
/// in the history with who asked; a viewer gets no actions; no sideways scroll at 375 px.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vm_page_charts_its_day_and_resets_after_a_confirm() {
    use crate::fake_pve::{FakePve, FakeVm};
    const MINUTE: i64 = 60_000;
    const HOUR: i64 = 60 * MINUTE;
    require_front_end();
    let fake = FakePve::start(vec![FakeVm::running(101, "pve1")]).await;
    let mut srv = crate::proxmox::start(
        Backend::Sqlite,
        &fake,
        &[
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ],
    )
    .await;
    for (name, role) in [("olga", "operator"), ("victor", "viewer")] {
        let user = json!({"username": name, "password": "operator password", "role": role});
        let (status, body) = srv
            .send(
                reqwest::Method::POST,
                "/api/users",
                Some(ADMIN_TOKEN),
                Some(user),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let vm = crate::proxmox::report_vm(&srv, 101, "pve1", 100).await;
    crate::people::opt_out(&srv, vm).await;
    let now = server::now_ms();
    let day_start = now - 24 * HOUR;
    let spike_at = day_start + 18 * HOUR + 2 * MINUTE;
    let gap = (day_start + 10 * HOUR)..(day_start + 12 * HOUR);
    let mut t = day_start + 10 * MINUTE;
    while t < now - 10 * MINUTE {
        if !gap.contains(&t) {
            let mut r = report_for("guest-101");
            r["vmid"] = json!(101);
            r["node"] = json!("pve1");
            r["cpu_percent"] = json!(if t == spike_at { 100.0 } else { 20.0 });
            r["observed_at"] = json!(
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t) * 1_000_000)
                    .unwrap()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap()
            );
            let (status, body) = srv.report(&r).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["vm_id"], vm);
        }
        t += if t < spike_at && t + 5 * MINUTE > spike_at {
            spike_at - t
        } else {
            5 * MINUTE
        };
    }

    let browser = Browser::start().await;
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser
        .sign_in(&srv.base, "olga", "operator password")
        .await;
    browser
        .client
        .goto(&format!("{}/vms/{vm}", srv.base))
        .await
        .unwrap();
    browser.hydrated().await;
    let peak = "figure[data-metric='cpu'] circle.peak";
    let cx: f64 = wait_for("the CPU chart", Duration::from_secs(10), || async {
        browser.attr(peak, "cx").await
    })
    .await
    .parse()
    .unwrap();
    // Where the spike was: its share of the day, across the chart's 720 units.
    let expected = (spike_at - day_start) as f64 / (24 * HOUR) as f64 * 720.0;
    assert!(
        (cx - expected).abs() < 8.0,
        "peak at {cx}, spike at {expected}"
    );
    let peak_t: i64 = browser
        .attr(peak, "data-t-ms")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (spike_at - 10 * MINUTE..=spike_at).contains(&peak_t),
        "peak point at {peak_t}, spike at {spike_at}"
    );
    // The silence is a break in the line (the day's first report, minutes before its
    // series started, is a run of its own): no vertex inside it.
    let line = "figure[data-metric='cpu'] path.line";
    let runs: usize = browser
        .attr(line, "data-runs")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(runs >= 2, "{runs} runs");
    let d = browser.attr(line, "d").await.unwrap();
    let x_of = |ms: i64| (ms - day_start) as f64 / (24 * HOUR) as f64 * 720.0;
    let silent = (x_of(gap.start) + 8.0)..(x_of(gap.end) - 8.0);
    for vertex in d.split_whitespace() {
        let x: f64 = vertex
            .trim_start_matches(['M', 'L'])
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(!silent.contains(&x), "{vertex} drawn inside the silence");
    }
    let tier = |want: &'static str| {
        let browser = &browser;
        async move {
            wait_for(want, Duration::from_secs(10), || async {
                let tier = browser.attr(".chart-source", "data-tier").await?;
                (tier == want).then_some(())
            })
            .await
        }
    };
    tier("minute").await;
    browser.screenshot("vm", 1280).await;
    for (range, want) in [("30d", "hour"), ("1y", "hour"), ("1h", "raw")] {
        browser
            .click(&format!(".ranges a[data-range='{range}']"))
            .await;
        tier(want).await;
        assert!(
            browser.client.current_url().await.unwrap().query() == Some(&format!("range={range}")),
            "the range is kept in the URL"
        );
    }

    // Reset asks first, naming the VM and its node.
    browser.click("section.actions button.reset").await;
    let question = browser.text_of(".confirm p").await.unwrap();
    assert!(
        question.contains("guest-101") && question.contains("pve1"),
        "{question}"
    );
    assert!(fake.posts().is_empty(), "asking sent a reset");
    browser.click(".confirm .confirm-yes").await;
    wait_for("the reset at Proxmox", Duration::from_secs(10), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    let row = wait_for(
        "the finished reset in the history",
        Duration::from_secs(20),
        || async { browser.text_of("table.history tr.outcome-ok").await },
    )
    .await;
    assert!(row.contains("olga"), "{row}");
    assert_eq!(fake.posts(), vec!["reset 101"], "exactly one reset");

    // No sideways scroll on a phone, on the VM page and the fleet.
    browser.screenshot("vm", 375).await;
    let wide = browser.sticking_out().await;
    assert!(
        wide.is_empty(),
        "the VM page scrolls sideways at 375 px: {wide:?}"
    );
    browser
        .client
        .goto(&format!("{}/", srv.base))
        .await
        .unwrap();
    browser.hydrated().await;
    browser.screenshot("fleet", 375).await;
    let wide = browser.sticking_out().await;
    assert!(
        wide.is_empty(),
        "the fleet scrolls sideways at 375 px: {wide:?}"
    );
    browser.screenshot("fleet", 1280).await;
    browser.close().await;

    // A viewer sees the page without any action.
    let viewer = Browser::start().await;
    viewer
        .sign_in(&srv.base, "victor", "operator password")
        .await;
    viewer
        .client
        .goto(&format!("{}/vms/{vm}", srv.base))
        .await
        .unwrap();
    viewer.hydrated().await;
    wait_for("the viewer's chart", Duration::from_secs(10), || async {
        viewer.attr(peak, "cx").await
    })
    .await;
    assert!(
        viewer
            .client
            .find(Locator::Css("section.actions"))
            .await
            .is_err(),
        "a viewer is offered actions"
    );
    viewer.close().await;
    assert_eq!(fake.posts().len(), 1);
    srv.stop().await;
}

/// The fleet's filters and sort live in the URL: a shared link shows the same view, typing
/// in the search box narrows the table without a reload, and a column header sorts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_filters_and_sorts_from_the_url() {
    require_front_end();
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ],
    )
    .await;
    let mut ids = Vec::new();
    for (host, cpu) in [("alpha-01", 90.0), ("beta-02", 10.0), ("gamma-03", 50.0)] {
        let mut r = report_for(host);
        r["cpu_percent"] = json!(cpu);
        let (status, body) = srv.report(&r).await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["vm_id"].as_i64().unwrap());
    }
    let browser = Browser::start().await;
    browser
        .sign_in(&srv.base, "admin", "correct horse battery")
        .await;
    let rows = || async {
        let mut names = Vec::new();
        for el in browser
            .client
            .find_all(Locator::Css("table.vms tbody a.hostname"))
            .await
            .unwrap()
        {
            names.push(el.text().await.unwrap());
        }
        names
    };
    browser
        .client
        .goto(&format!("{}/?q=alpha", srv.base))
        .await
        .unwrap();
    browser.hydrated().await;
    assert_eq!(rows().await, vec!["alpha-01"]);
    // Typing replaces the query; the table follows without a reload.
    browser
        .client
        .execute("window.not_reloaded = true", vec![])
        .await
        .unwrap();
    let search = browser
        .client
        .find(Locator::Css("input[name='q']"))
        .await
        .unwrap();
    search.clear().await.unwrap();
    search.send_keys("a").await.unwrap();
    wait_for("all three hosts", Duration::from_secs(10), || async {
        (rows().await.len() == 3).then_some(())
    })
    .await;
    browser.click("th a.sort[data-sort='cpu']").await;
    wait_for("sorted by CPU", Duration::from_secs(10), || async {
        (rows().await == vec!["beta-02", "gamma-03", "alpha-01"]).then_some(())
    })
    .await;
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(url.query(), Some("q=a&sort=cpu"), "{url}");
    browser.click("th a.sort[data-sort='cpu']").await;
    wait_for("CPU, highest first", Duration::from_secs(10), || async {
        (rows().await == vec!["alpha-01", "gamma-03", "beta-02"]).then_some(())
    })
    .await;
    let kept = browser
        .client
        .execute("return window.not_reloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(kept, json!(true), "the page reloaded");
    browser.close().await;
    srv.stop().await;
}

/// A fleet larger than a page: the server sends one page of rows in the table's order, the
/// summary still counts every VM, and a new filter starts from the first page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_larger_than_a_page_is_paged() {
    require_front_end();
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ],
    )
    .await;
    let total = domain::view::FLEET_PAGE + 5;
    for i in 0..total {
        let (status, body) = srv.report(&report_for(&format!("host-{i:03}"))).await;
        assert_eq!(status, 200, "{body}");
    }
    let browser = Browser::start().await;
    browser
        .sign_in(&srv.base, "admin", "correct horse battery")
        .await;
    // Read in one script: two hundred element lookups could meet a row redrawn meanwhile.
    let rows = || async {
        let names = browser
            .client
            .execute(
                "return Array.from(document.querySelectorAll('table.vms tbody a.hostname'), e => e.textContent)",
                vec![],
            )
            .await
            .unwrap();
        serde_json::from_value::<Vec<String>>(names).unwrap()
    };
    browser
        .client
        .goto(&format!("{}/?sort=name", srv.base))
        .await
        .unwrap();
    browser.hydrated().await;
    let first = rows().await;
    assert_eq!(first.len(), domain::view::FLEET_PAGE);
    assert_eq!(first[0], "host-000");
    assert_eq!(
        browser.text_of("nav.pager span").await.unwrap(),
        format!("VMs 1-{} of {total}", domain::view::FLEET_PAGE)
    );
    browser
        .client
        .execute("window.not_reloaded = true", vec![])
        .await
        .unwrap();
    browser.click("nav.pager a[rel='next']").await;
    wait_for("the second page", Duration::from_secs(10), || async {
        (rows().await.len() == 5).then_some(())
    })
    .await;
    assert_eq!(
        rows().await[0],
        format!("host-{:03}", domain::view::FLEET_PAGE)
    );
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(url.query(), Some("sort=name&page=2"), "{url}");
    let summary = browser.text_of(".summary").await.unwrap();
    assert!(summary.contains(&total.to_string()), "{summary}");
    // A search from page 2 starts again at page 1 of what it finds.
    let search = browser
        .client
        .find(Locator::Css("input[name='q']"))
        .await
        .unwrap();
    search.send_keys("host-00").await.unwrap();
    wait_for(
        "the search's first page",
        Duration::from_secs(10),
        || async { (rows().await.len() == 10).then_some(()) },
    )
    .await;
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(url.query(), Some("q=host-00&sort=name"), "{url}");
    assert!(
        browser.text_of("nav.pager").await.is_none(),
        "one page needs no pager"
    );
    let kept = browser
        .client
        .execute("return window.not_reloaded === true", vec![])
        .await
        .unwrap();
    assert_eq!(kept, json!(true), "the page reloaded");
    browser.close().await;
    srv.stop().await;
}

/// With Redis configured but unreachable, changes from other replicas cannot arrive: the page
/// says it is polling every 5 s, and a new VM still shows up without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_its_push_channel_the_page_says_so_and_polls() {
    require_front_end();
    let unreachable = format!("redis://127.0.0.1:{}", free_port());
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
            ("REDIS_URL", &unreachable),
        ],
    )
    .await;
    let browser = Browser::start().await;
    browser
        .sign_in(&srv.base, "admin", "correct horse battery")
        .await;
    browser.live_mode("poll").await;
    let said = browser.text_of(".live").await.unwrap_or_default();
    assert!(said.contains("refreshing every 5 s"), "{said}");
    let (status, body) = srv.report(&report_for("polled-vm")).await;
    assert_eq!(status, 200, "{body}");
    wait_for("the VM by polling", Duration::from_secs(15), || async {
        let text = browser.text_of("table.vms").await?;
        text.contains("polled-vm").then_some(())
    })
    .await;
    browser.close().await;
    srv.stop().await;
}

/// Settings: a CPU threshold changed by an admin turns a VM warning at once on an open fleet
/// page, without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_threshold_change_turns_a_vm_warning_on_the_open_page() {
    require_front_end();
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ],
    )
    .await;
    let (status, body) = srv.report(&report_for("steady-vm")).await;
    assert_eq!(status, 200, "{body}");
    let vm = body["vm_id"].as_i64().unwrap();
    let badge = format!("tr[data-vm-id='{vm}'] .badge");

    let browser = Browser::start().await;
    browser
        .sign_in(&srv.base, "admin", "correct horse battery")
        .await;
    browser.live_mode("push").await;
    assert_eq!(
        browser.attr(&badge, "class").await.as_deref(),
        Some("badge healthy")
    );

    // Another admin lowers the CPU threshold below the VM's 12.5 %: the open page follows.
    let (_, mut settings) = srv.get("/api/settings").await;
    settings["status"]["cpu_threshold"] = json!(10.0);
    let (status, answer) = srv
        .send(
            reqwest::Method::PUT,
            "/api/settings",
            Some(ADMIN_TOKEN),
            Some(settings),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    wait_for(
        "the VM to turn warning on the open page",
        Duration::from_secs(5),
        || async {
            browser
                .attr(&badge, "class")
                .await
                .filter(|b| b == "badge warning")
        },
    )
    .await;

    browser.close().await;
    srv.stop().await;
}

impl Browser {
    /// Clears the text field `name` inside `form` and types `value`.
    async fn retype(&self, form: &str, name: &str, value: &str) {
        let field = self
            .client
            .find(Locator::Css(&format!("{form} input[name='{name}']")))
            .await
            .unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }

    /// Follows a link of the top bar, as a person would, and waits for the page's title.
    async fn open_from_menu(&self, href: &str, title: &str) {
        self.click(&format!(".topbar a[href='{href}']")).await;
        wait_for(
            &format!("the {title} page"),
            Duration::from_secs(10),
            || async { self.text_of(".panel-title").await.filter(|t| t == title) },
        )
        .await;
        assert_eq!(self.path().await, href);
    }

    /// Whether the page is still the one loaded first (a full reload would drop the mark).
    async fn same_document(&self) -> bool {
        self.client
            .execute("return window.vmhcMark === 1;", vec![])
            .await
            .unwrap()
            == json!(true)
    }
}

/// The admin pages in a real browser: reached from the menu without a page load; the
/// settings form shows a bad value's error by its field and saves nothing, and a good CPU
/// threshold turns a VM warning at once on a fleet page open in another window; the add-VM
/// page fills a new token into the commands and shows the VM that enrols with it arrive,
/// without a reload and keeping the token on screen; a token is revoked from its row after
/// a confirmation; screenshots at 1280 and 375 px, no sideways scroll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_pages_set_thresholds_and_add_a_vm() {
    require_front_end();
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[
            ("ADMIN_USERNAME", "admin"),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ],
    )
    .await;
    let (status, body) = srv.report(&report_for("steady-vm")).await;
    assert_eq!(status, 200, "{body}");
    let vm = body["vm_id"].as_i64().unwrap();
    let badge = format!("tr[data-vm-id='{vm}'] .badge");

    let browser = Browser::start().await;
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser
        .sign_in(&srv.base, "admin", "correct horse battery")
        .await;
    // A second window keeps the fleet page open.
    let settings_window = browser.client.window().await.unwrap();
    let fleet_window = browser.client.new_window(false).await.unwrap().handle;
    browser
        .client
        .switch_to_window(fleet_window.clone())
        .await
        .unwrap();
    browser
        .client
        .goto(&format!("{}/", srv.base))
        .await
        .unwrap();
    browser.hydrated().await;
    browser.live_mode("push").await;
    assert_eq!(
        browser.attr(&badge, "class").await.as_deref(),
        Some("badge healthy")
    );
    browser
        .client
        .switch_to_window(settings_window.clone())
        .await
        .unwrap();

    browser
        .client
        .execute("window.vmhcMark = 1;", vec![])
        .await
        .unwrap();
    browser.open_from_menu("/settings", "Settings").await;
    assert!(browser.same_document().await, "no page load between pages");
    browser.screenshot("settings", 1280).await;
    browser.screenshot("settings", 375).await;
    let wide = browser.sticking_out().await;
    assert!(wide.is_empty(), "sticks out at 375 px: {wide:?}");
    browser.client.set_window_size(1280, 900).await.unwrap();

    let save = "form[data-action='save']";
    browser.retype(save, "status.cpu_threshold", "150").await;
    browser
        .click(&format!("{save} button[type='submit']"))
        .await;
    let error = wait_for("the field's error", Duration::from_secs(10), || async {
        browser
            .text_of(".field[data-field='status.cpu_threshold'] .field-error")
            .await
    })
    .await;
    assert!(error.contains("between"), "{error}");
    let (_, settings) = srv.get("/api/settings").await;
    assert_eq!(settings["status"]["cpu_threshold"], 80.0, "nothing changed");

    browser.retype(save, "status.cpu_threshold", "10").await;
    browser
        .click(&format!("{save} button[type='submit']"))
        .await;
    wait_for("the saved answer", Duration::from_secs(10), || async {
        browser.text_of(&format!("{save} .outcome.ok")).await
    })
    .await;
    browser.client.switch_to_window(fleet_window).await.unwrap();
    wait_for(
        "the VM to turn warning on the open fleet page",
        Duration::from_secs(5),
        || async {
            browser
                .attr(&badge, "class")
                .await
                .filter(|b| b == "badge warning")
        },
    )
    .await;
    browser
        .client
        .switch_to_window(settings_window)
        .await
        .unwrap();

    // Add a VM: a token filled into the commands, then the VM arriving on the open page.
    browser.open_from_menu("/add-vm", "Add a VM").await;
    assert!(browser.same_document().await, "no page load between pages");
    browser.screenshot("add-vm", 375).await;
    let wide = browser.sticking_out().await;
    assert!(wide.is_empty(), "sticks out at 375 px: {wide:?}");
    browser.screenshot("add-vm", 1280).await;
    browser.live_mode("push").await;
    let enrol = "form[data-action='enrol']";
    browser.retype(enrol, "label", "web servers").await;
    browser
        .click(&format!("{enrol} button[type='submit']"))
        .await;
    let linux = wait_for(
        "the filled-in commands",
        Duration::from_secs(10),
        || async {
            browser
                .text_of(&format!("{enrol} .outcome.ok pre.code"))
                .await
        },
    )
    .await;
    let token = linux
        .split('\'')
        .find(|part| part.starts_with("vmhc_enrol_"))
        .unwrap_or_else(|| panic!("the token is in the command: {linux}"))
        .to_owned();
    let (status, body) = srv
        .report_raw(
            report_for("arrival-01").to_string().into_bytes(),
            Some(&token),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the new VM on the open page",
        Duration::from_secs(5),
        || async {
            browser
                .text_of("[data-live] tbody")
                .await
                .filter(|t| t.contains("arrival-01"))
        },
    )
    .await;
    assert!(
        browser
            .text_of(&format!("{enrol} .outcome.ok"))
            .await
            .is_some_and(|t| t.contains(&token)),
        "the token shown once stays on screen while VMs arrive"
    );
    assert!(browser.same_document().await);

    // Tokens: the enrolment token revoked from its row, after a confirmation.
    browser.open_from_menu("/tokens", "Tokens").await;
    let (_, tokens) = srv.get("/api/enrolment-tokens").await;
    let id = tokens[0]["id"].as_i64().unwrap();
    browser
        .click(&format!("button.row-action[value='revoke-enrolment {id}']"))
        .await;
    let question = browser.client.get_alert_text().await.unwrap();
    assert!(
        question.contains(&format!("Revoke enrolment token {id}")),
        "{question}"
    );
    browser.client.accept_alert().await.unwrap();
    wait_for("the revocation", Duration::from_secs(10), || async {
        browser
            .text_of(".outcome.ok")
            .await
            .filter(|t| t.contains("revoked"))
    })
    .await;
    let (_, tokens) = srv.get("/api/enrolment-tokens").await;
    assert!(tokens[0]["revoked_ms"].is_i64(), "{tokens}");
    let (status, _) = srv
        .report_raw(report_for("late-02").to_string().into_bytes(), Some(&token))
        .await;
    assert_eq!(status, 401, "a revoked token enrols nothing");

    browser.close().await;
    srv.stop().await;
}
