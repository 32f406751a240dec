//! The dashboard in a real headless Chromium, driven through chromedriver (WebDriver), against
//! a real `microagent serve` with test-guest workspaces: pick a VM, take snapshots through the
//! dialog (a `<script>` note shows as text), edit a note (shown at once), search, a Delete the
//! diff chain forbids (disabled, with its reason), delete after confirming, fork from a card
//! (the forks appear live), the card/list choice kept across a reload. Screenshots at desktop
//! and phone widths are saved under the target directory.

mod common;
use common::*;

#[path = "common/webdriver.rs"]
mod webdriver;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use webdriver::Browser;

const GUEST: &[&str] = &[
    "--kernel",
    "builtin:testguest",
    "--vcpus",
    "1",
    "--mem",
    "64",
    "--cmdline",
    "mode=counter mem=2 tick_ms=20",
];

struct Server {
    child: Child,
    base: String,
    token: String,
}

impl Server {
    fn start(h: &Home) -> Server {
        let mut child = Command::new(bin())
            .env("MICROAGENT_HOME", &h.dir)
            .args(["--json", "serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let token = std::fs::read_to_string(h.dir.join("serve-token")).unwrap();
        Server {
            child,
            base: v["url"].as_str().unwrap().trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where screenshots go: kept after the run for a person to look at.
fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-shots")
}

fn browser_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    match webdriver::missing() {
        None => true,
        Some(why) => {
            require::skip(test, "browser", &why);
            false
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const LONG: Duration = Duration::from_secs(90);

fn card(tag: &str) -> String {
    format!("#snapshots .card[data-tag=\"{tag}\"]")
}

/// Clicks `button` until dialog `id` is open: the page re-renders its cards on every event, and
/// a click that lands on a node being replaced is lost.
async fn open_dialog(b: &Browser, button: &str, id: &str) {
    let js = format!("document.getElementById('{id}').open");
    for _ in 0..10 {
        b.click_on(button).await;
        for _ in 0..20 {
            if b.eval(&js).await == Value::Bool(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!(
        "dialog {id} never opened from {button}:\n{}",
        b.page_text().await
    );
}

/// Fills and submits the + New dialog.
async fn new_snapshot(b: &Browser, name: &str, notes: &str) {
    open_dialog(b, "#btn-new", "dlg-new").await;
    b.type_text(&b.find("#new-name").await, name).await;
    b.type_text(&b.find("#new-notes").await, notes).await;
    b.click_on("#new-submit").await;
    b.wait(&card(name), LONG).await;
}

#[test]
fn dashboard_checkpoints_in_chromium() {
    if !browser_or_skip("dashboard_checkpoints_in_chromium") {
        return;
    }
    let h = Home::new("dashboard");
    for name in ["alpha", "beta"] {
        let mut args = vec!["create", name];
        args.extend_from_slice(GUEST);
        h.ok(&args);
    }
    h.ok(&["start", "beta"]);
    let s = Server::start(&h);
    let profile = std::env::temp_dir().join(format!("ma-chromium-{}", std::process::id()));
    rt().block_on(async {
        let b = Browser::start(&profile).await;
        // The token once; the cookie after.
        b.goto(&format!("{}/login?token={}", s.base, s.token)).await;
        assert_eq!(b.current_url().await, format!("{}/", s.base));
        b.wait("#vm-picker option[value=\"beta\"]", LONG).await;

        // Pick a VM: its state shows beside the picker.
        b.click_on("#vm-picker option[value=\"beta\"]").await;
        b.wait("#vm-dot.running", LONG).await;
        b.wait_js(
            "empty list",
            "document.getElementById('empty').textContent.includes('No snapshots yet')",
            LONG,
        )
        .await;

        // + New with notes (one that tries to be HTML): the card appears, labelled Latest.
        let hostile = "hello <script>window.pwned=1</script> <b>bold</b> world";
        new_snapshot(&b, "cp1", hostile).await;
        let notes = b.text_of(&format!("{} .notes", card("cp1"))).await;
        assert_eq!(notes, hostile, "notes must show as text");
        assert_eq!(b.eval("window.pwned === undefined").await, Value::Bool(true));
        assert_eq!(
            b.find_all(&format!("{} .notes b", card("cp1"))).await.len(),
            0,
            "user text became markup"
        );
        b.find(&format!("{} .badge.latest", card("cp1"))).await;
        new_snapshot(&b, "cp2", "second one").await;
        // Latest moved; cp1 now offers Restore, cp2 (Latest) does not.
        b.find(&format!("{} .badge.latest", card("cp2"))).await;
        assert!(b
            .find_all(&format!("{} .badge.latest", card("cp1")))
            .await
            .is_empty());
        b.find(&format!("{} button[data-action=restore]", card("cp1")))
            .await;
        assert!(b
            .find_all(&format!("{} button[data-action=restore]", card("cp2")))
            .await
            .is_empty());

        // A diff on top of cp2 (from the terminal): the card shows up live, with its parent, and
        // cp2's Delete is disabled with the reason.
        h.ok(&["snapshot", "create", "beta", "--tag", "d1", "--type", "diff"]);
        b.wait(&card("d1"), LONG).await;
        let meta = b.text_of(&format!("{} .meta", card("d1"))).await;
        assert!(meta.contains("diff of cp2"), "{meta}");
        assert_eq!(
            b.property_of(
                &format!("{} button[data-action=delete]", card("cp2")),
                "disabled"
            )
            .await,
            Value::Bool(true)
        );
        let reason = b.text_of(&format!("{} .reason", card("cp2"))).await;
        assert!(reason.contains("Needed by d1"), "{reason}");

        // Edit cp1's notes: the card shows them at once.
        open_dialog(&b, &format!("{} button[data-action=edit]", card("cp1")), "dlg-edit").await;
        let field = b.find("#edit-notes").await;
        assert_eq!(b.property(&field, "value").await, Value::String(hostile.into()));
        b.clear(&field).await;
        b.type_text(&field, "edited notes").await;
        b.click_on("#edit-submit").await;
        b.wait_js(
            "edited notes shown",
            &format!(
                "(document.querySelector('{} .notes')||{{}}).textContent === 'edited notes'",
                card("cp1").replace('\'', "\\'")
            ),
            Duration::from_secs(20),
        )
        .await;

        // Search by a word of the notes.
        let search = b.find("#search").await;
        b.type_text(&search, "edited").await;
        b.wait_js(
            "search filters",
            "document.querySelectorAll('#snapshots .card').length === 1",
            LONG,
        )
        .await;
        b.find(&card("cp1")).await;
        b.clear(&search).await;
        b.type_text(&search, " ").await;
        b.wait_js(
            "search cleared",
            "document.querySelectorAll('#snapshots .card').length === 3",
            LONG,
        )
        .await;

        // Delete d1 after confirming; cp2's Delete is then allowed.
        open_dialog(&b, &format!("{} button[data-action=delete]", card("d1")), "dlg-confirm").await;
        let text = b.text_of("#confirm-text").await;
        assert!(text.contains("d1"), "{text}");
        b.click_on("#confirm-ok").await;
        b.wait_js(
            "d1 gone",
            &format!("!document.querySelector('{}')", card("d1").replace('\'', "\\'")),
            LONG,
        )
        .await;
        assert!(!h.ws("beta").join("snapshots/d1").exists());
        b.wait_js(
            "cp2 deletable",
            &format!(
                "document.querySelector('{} button[data-action=delete]').disabled === false",
                card("cp2").replace('\'', "\\'")
            ),
            LONG,
        )
        .await;

        // Fork 2 from cp1's card: both appear in the picker, running, without a reload.
        open_dialog(&b, &format!("{} button[data-action=fork]", card("cp1")), "dlg-fork").await;
        let name = b.find("#fork-name").await;
        b.clear(&name).await;
        b.type_text(&name, "fk").await;
        let count = b.find("#fork-count").await;
        b.clear(&count).await;
        b.type_text(&count, "2").await;
        b.type_text(&b.find("#fork-ttl").await, "30m").await;
        b.click_on("#fork-submit").await;
        for f in ["fk-1", "fk-2"] {
            b.wait_js(
                f,
                &format!(
                    "[...document.querySelectorAll('#vm-picker option')].some(o => o.value === '{f}' && o.textContent.includes('running'))"
                ),
                LONG,
            )
            .await;
        }

        // Screenshots while it shows something: desktop, then phone width.
        b.set_size(1280, 900).await;
        b.screenshot(&shots().join("desktop-cards.png")).await;

        // The list view survives a reload.
        b.click_on("#view-list").await;
        b.wait("#snapshots.list", LONG).await;
        b.screenshot(&shots().join("desktop-list.png")).await;
        b.refresh().await;
        b.wait("#snapshots.list .card", LONG).await;
        let pressed = b.find("#view-list").await;
        assert_eq!(
            b.eval("document.getElementById('view-list').getAttribute('aria-pressed')")
                .await,
            Value::String("true".into())
        );
        let _ = pressed;
        b.set_size(390, 844).await;
        b.wait("#snapshots .card", LONG).await;
        b.screenshot(&shots().join("phone-list.png")).await;
        b.click_on("#view-cards").await;
        b.screenshot(&shots().join("phone-cards.png")).await;
        // The + New dialog at phone width, then cancelled (Escape closes it too).
        open_dialog(&b, "#btn-new", "dlg-new").await;
        b.screenshot(&shots().join("phone-new-dialog.png")).await;
        b.click_on("#dlg-new .cancel").await;
        b.wait_js("new dialog closed", "!document.getElementById('dlg-new').open", LONG)
            .await;
        // Nothing is wider than the phone's screen.
        assert_eq!(
            b.eval("document.documentElement.scrollWidth <= window.innerWidth")
                .await,
            Value::Bool(true),
            "the page scrolls sideways at phone width"
        );
        b.close().await;
    });
    eprintln!("screenshots in {}", shots().display());
}

#[test]
fn dashboard_restore_of_a_stopped_vm_in_chromium() {
    if !browser_or_skip("dashboard_restore_of_a_stopped_vm_in_chromium") {
        return;
    }
    let h = Home::new("dashboard-restore");
    let mut args = vec!["create", "gamma"];
    args.extend_from_slice(GUEST);
    h.ok(&args);
    h.ok(&["start", "gamma"]);
    let before = h.wait_counts("gamma", &[5])[0];
    h.ok(&["snapshot", "create", "gamma", "--tag", "early"]);
    let at_snapshot = *counts(&h.console("gamma"))
        .iter()
        .map(|(_, n)| n)
        .max()
        .unwrap();
    let later = h.wait_counts("gamma", &[at_snapshot + 100])[0];
    h.ok(&["snapshot", "create", "gamma", "--tag", "late"]);
    h.ok(&["halt", "gamma"]);
    let s = Server::start(&h);
    let profile = std::env::temp_dir().join(format!("ma-chromium-r-{}", std::process::id()));
    rt().block_on(async {
        let b = Browser::start(&profile).await;
        b.goto(&format!("{}/login?token={}", s.base, s.token)).await;
        b.wait(&card("early"), LONG).await;
        // Latest has no Restore; the older one has, and asks first.
        assert!(b
            .find_all(&format!("{} button[data-action=restore]", card("late")))
            .await
            .is_empty());
        open_dialog(
            &b,
            &format!("{} button[data-action=restore]", card("early")),
            "dlg-confirm",
        )
        .await;
        b.click_on("#confirm-ok").await;
        b.wait("#vm-dot.running", LONG).await;
        // The stopped-workspace notice goes with the state it described.
        b.wait_js(
            "notice hidden",
            "document.getElementById('notice').hidden",
            LONG,
        )
        .await;
        b.screenshot(&shots().join("restored-running.png")).await;
        b.close().await;
    });
    // The guest's counter goes on from the snapshot, not from where it was halted.
    h.wait_counts("gamma", &[0]);
    let first = counts(&h.console("gamma"))
        .first()
        .map(|(_, n)| *n)
        .expect("a count after the restore");
    assert!(
        first >= before && first < later,
        "first count after restore {first}: snapshot taken after {before}, halted after {later}"
    );
}
