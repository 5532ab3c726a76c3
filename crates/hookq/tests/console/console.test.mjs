// The dead-letter console in a real headless Chromium, against a real hookq
// (`hookq up` on its own prefix, started here) and a real target (an HTTP
// server here that rejects with 400, so the webhooks dead-letter as
// `rejected`, until the test makes it accept).
//
// Run by the `it` test binary (tests/it/admin/console.rs), which gives:
//   HOOKQ_BIN      the hookq binary
//   HOOKQ_CONFIG   a config file: its own amqp.prefix and dedup file, the admin token
//   HOOKQ_TOKEN    the admin token
//   SCREENSHOTS    where the screenshots go (a scratch directory; docs/console with HOOKQ_SCREENSHOTS=docs/console)
//   CHROMIUM       the browser (default /usr/bin/chromium)
// It prints one line per step and ends with "console: N passed, 0 failed".

import { spawn } from "node:child_process";
import http from "node:http";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (run through tests/it/admin/console.rs)`);
  return v;
};
const BIN = env("HOOKQ_BIN");
const CONFIG = env("HOOKQ_CONFIG");
const TOKEN = env("HOOKQ_TOKEN");
const SHOTS = env("SCREENSHOTS");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
mkdirSync(SHOTS, { recursive: true });

let passed = 0;
const step = (what) => { passed += 1; console.log(`console: ok ${passed} - ${what}`); };

async function until(what, cond, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// ---- the target ------------------------------------------------------------
let accepting = false;
const delivered = new Map(); // key -> 2xx answers
const rejected = new Map();
const target = http.createServer((req, res) => {
  req.resume();
  req.on("end", () => {
    const key = req.headers["idempotency-key"] || "";
    const m = accepting ? delivered : rejected;
    m.set(key, (m.get(key) || 0) + 1);
    res.writeHead(accepting ? 200 : 400, { "content-type": "text/plain" });
    res.end(accepting ? "ok" : "no thanks");
  });
});
await new Promise((r) => target.listen(0, "127.0.0.1", r));
const targetUrl = `http://127.0.0.1:${target.address().port}/hooks`;

// ---- hookq -----------------------------------------------------------------
const hookq = spawn(BIN, ["--config", CONFIG, "up", "--log-format", "json"], {
  env: { ...process.env, HOOKQ__WORKER__TARGET: targetUrl, HOOKQ_LOG: "info" },
  stdio: ["ignore", "ignore", "pipe"],
});
const logs = [];
const base = await new Promise((resolve, reject) => {
  let buf = "";
  const timer = setTimeout(() => reject(new Error("hookq did not say where it listens")), 30000);
  hookq.stderr.on("data", (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      logs.push(line);
      try {
        const v = JSON.parse(line);
        if (String(v.message || "").startsWith("ingress listening")) {
          clearTimeout(timer);
          resolve(`http://${v.addr}`);
        }
      } catch (_) { /* not JSON */ }
    }
  });
  hookq.on("exit", (code) => reject(new Error(`hookq exited early (${code}): ${logs.join("\n")}`)));
});

const api = async (path, opts = {}) => {
  const r = await fetch(base + path, { ...opts, headers: { authorization: `Bearer ${TOKEN}`, ...(opts.headers || {}) } });
  return { status: r.status, body: await r.json() };
};

let browser;
let exitCode = 0;
try {
  await until("hookq ready", async () => (await fetch(base + "/readyz").catch(() => ({ status: 0 }))).status === 200);

  // Six webhooks whose bodies and headers try to run script in the console.
  const XSS = `<img src=x onerror="document.title='pwned'"><script>document.title='pwned'</script>`;
  const sent = [];
  for (const [source, n] of [["shop", 3], ["billing", 3]]) {
    for (let i = 1; i <= n; i++) {
      const id = `${source}-${i}`;
      const r = await fetch(`${base}/hooks/${source}`, {
        method: "POST",
        headers: { "content-type": "application/json", "idempotency-key": id, "x-evil": XSS },
        body: JSON.stringify({ id, order: i, note: XSS }),
      });
      assert.equal(r.status, 202);
      sent.push(`${source}:${id}`);
    }
  }
  await until("six dead letters", async () => (await api("/admin/dlq/stats")).body.total === 6);
  step("six webhooks rejected by the target are dead letters (reason rejected)");

  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  const desktop = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await desktop.newPage();
  const dialogs = [];
  page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });

  // Login: a wrong token is refused, the right one opens the list.
  await page.goto(base + "/admin/");
  await page.waitForSelector("#login:not([hidden])");
  await page.screenshot({ path: join(SHOTS, "login.png") });
  await page.fill("#token", "this-is-not-the-token");
  await page.click("#login-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#login-error").textContent.includes("refused"));
  step("a wrong token is refused on the login screen");
  await page.fill("#token", TOKEN);
  await page.click("#login-form button[type=submit]");
  await page.waitForSelector("#list-view:not([hidden])");
  await page.waitForFunction(() => document.querySelectorAll("#list tbody tr[data-id]").length === 6);
  const total = await page.textContent("#stats .stat .value");
  assert.equal(total.trim(), "6");
  assert.equal(await page.evaluate((k) => sessionStorage.getItem(k), "hookq-admin-token"), TOKEN);
  await page.screenshot({ path: join(SHOTS, "list.png"), fullPage: true });
  step("the right token shows the stats and the six dead letters; the token is in sessionStorage");

  // Nothing the dead letters carry ran or became markup.
  assert.equal(await page.title(), "hookq · console");
  assert.equal(await page.locator("#list img, #list script").count(), 0);
  const preview = await page.textContent("#list tbody tr td.preview");
  assert.ok(preview.includes("<img src=x"), preview);
  step("bodies are shown as text: no element, no script from a dead letter");

  // A phone: the same list as cards.
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  const p2 = await phone.newPage();
  await p2.goto(base + "/admin/");
  await p2.fill("#token", TOKEN);
  await p2.click("#login-form button[type=submit]");
  await p2.waitForSelector("#list-view:not([hidden])");
  await p2.waitForFunction(() => document.querySelectorAll("#list tbody tr[data-id]").length === 6);
  const overflow = await p2.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `the phone page scrolls sideways by ${overflow}px`);
  await p2.screenshot({ path: join(SHOTS, "phone-list.png"), fullPage: false });
  await phone.close();
  step("on a phone-size screen the list fits the width (cards)");

  // Filter by source.
  await page.fill("#f-source", "shop");
  await page.click("#apply");
  await page.waitForFunction(() => document.querySelectorAll("#list tbody tr[data-id]").length === 3);
  const sources = await page.$$eval("#list tbody tr[data-id] td[data-label=Source]", (tds) => tds.map((t) => t.textContent));
  assert.deepEqual(sources, ["shop", "shop", "shop"]);
  await page.selectOption("#f-reason", "max_attempts");
  await page.click("#apply");
  await page.waitForFunction(() => document.querySelector("#list-note").textContent.startsWith("0 of 6"));
  await page.selectOption("#f-reason", "rejected");
  await page.click("#apply");
  await page.waitForFunction(() => document.querySelectorAll("#list tbody tr[data-id]").length === 3);
  step("the source and reason filters narrow the table");

  // The detail view: body and headers, as text.
  const firstKey = await page.textContent("#list tbody tr[data-id] td.key button");
  await page.click("#list tbody tr[data-id] td.key button");
  await page.waitForSelector("#detail-view:not([hidden])");
  const body = await page.textContent("#detail-body");
  assert.equal(await page.textContent("#detail-title"), firstKey);
  assert.ok(body.includes(`"id": "${firstKey.split(":")[1]}"`) && body.includes("<script>"), body);
  const headers = await page.textContent("#detail-request");
  assert.ok(headers.includes("x-evil") && headers.includes("onerror"), headers);
  const hq = await page.textContent("#detail-hookq");
  assert.ok(hq.includes("hookq-dead-reason") && hq.includes("rejected"), hq);
  assert.equal(await page.locator("#detail-view img, #detail-view script").count(), 0);
  await page.screenshot({ path: join(SHOTS, "detail.png"), fullPage: true });
  await page.click("#back");
  await page.waitForSelector("#list-view:not([hidden])");
  step("the detail view shows the full body and the headers, as text");

  // Dry run of a selection of two: lists them, moves nothing.
  const boxes = page.locator("#list tbody tr[data-id] td.check input");
  await boxes.nth(0).check();
  await boxes.nth(1).check();
  await page.waitForFunction(() => document.querySelector("#selection-note").textContent.startsWith("2 selected"));
  await page.click("#dry-run");
  await page.waitForSelector("#outcome:not([hidden])");
  const dry = await page.textContent("#outcome");
  assert.ok(dry.includes("Dry run: 2 dead letter(s) would move back"), dry);
  await page.screenshot({ path: join(SHOTS, "dry-run.png"), fullPage: true });
  assert.equal((await api("/admin/dlq/stats")).body.total, 6);
  assert.equal(delivered.size, 0);
  step("a dry run of the selection says what would move and moves nothing");

  // Move back everything the filter (source shop) matches, once the target accepts.
  accepting = true;
  await boxes.nth(0).uncheck();
  await boxes.nth(1).uncheck();
  await page.click("#move");
  await page.waitForSelector("#confirm:not([hidden])");
  assert.ok((await page.textContent("#confirm-text")).includes("source = shop"));
  // Record whether the progress shows while the run goes (it may be short).
  await page.evaluate(() => {
    window.__progressSeen = [];
    const box = document.querySelector("#progress-box");
    new MutationObserver(() => {
      if (!box.hidden) window.__progressSeen.push(document.querySelector("#progress-text").textContent);
    }).observe(box, { attributes: true, subtree: true, childList: true, characterData: true });
  });
  await page.click("#confirm-yes");
  await page.waitForFunction(() => document.querySelector("#outcome").textContent.includes("Moved 3 dead letter(s)"));
  await page.waitForFunction(() => document.querySelector("#list-note").textContent.startsWith("0 of 3"));
  const seen = await page.evaluate(() => window.__progressSeen);
  assert.ok(seen.length > 0 && seen[0] === "moving…", `the progress showed while moving: ${JSON.stringify(seen)}`);
  assert.ok(await page.isHidden("#progress-box"), "and went away with the outcome");
  await page.waitForFunction(() => document.querySelector("#stats .stat .value").textContent.trim() === "3");
  await page.screenshot({ path: join(SHOTS, "outcome.png"), fullPage: true });
  step("moving back the filter's dead letters shows the outcome and empties the filtered table");

  // The rest (billing), selected with the header checkbox.
  await page.fill("#f-source", "");
  await page.selectOption("#f-reason", "");
  await page.click("#apply");
  await page.waitForFunction(() => document.querySelectorAll("#list tbody tr[data-id]").length === 3);
  await page.check("#select-all");
  await page.click("#move");
  await page.click("#confirm-yes");
  await page.waitForFunction(() => document.querySelector("#outcome").textContent.includes("Moved 3 dead letter(s)"));
  await page.waitForFunction(() => document.querySelector("#list-note").textContent.startsWith("0 of 0"));
  await page.waitForFunction(() => document.querySelector("#stats .stat .value").textContent.trim() === "0");
  step("the selection moves back; the stats say none is left");

  await until("each webhook delivered", () => sent.every((k) => delivered.get(k) >= 1));
  await new Promise((r) => setTimeout(r, 500)); // a second delivery would show by now
  for (const k of sent) assert.equal(delivered.get(k), 1, `${k} delivered once`);
  assert.equal(delivered.size, 6);
  step("the target received each of the six webhooks exactly once");

  // The targets panel: pause and resume the target from the console.
  const row = `#targets tr[data-target="${targetUrl}"]`;
  await page.waitForSelector(`${row} .state.closed`);
  await page.click(`${row} button`);
  await page.waitForSelector(`${row} .state.paused`);
  step("pausing the target in the console shows it paused");
  const held = await fetch(`${base}/hooks/shop`, {
    method: "POST",
    headers: { "content-type": "application/json", "idempotency-key": "paused-1" },
    body: "{}",
  });
  assert.equal(held.status, 202);
  await until("the webhook held", async () => (await api("/admin/targets")).body.targets[0].held === 1);
  await page.waitForFunction((sel) => document.querySelector(sel + ' td[data-label="Held"]').textContent === "1", row, { timeout: 10000 });
  await page.screenshot({ path: join(SHOTS, "targets.png") });
  assert.equal(delivered.get("shop:paused-1") || 0, 0, "delivered while paused");
  step("a webhook sent while the target is paused is held, shown as held, not delivered");
  await page.click(`${row} button`);
  await page.waitForSelector(`${row} .state.closed`);
  await until("the held webhook delivered", () => delivered.get("shop:paused-1") === 1);
  step("resuming shows it closed and delivers the held webhook once");

  assert.deepEqual(dialogs, [], "no dialog was opened by a dead letter");
  assert.equal(await page.title(), "hookq · console");
  assert.deepEqual(consoleErrors.filter((e) => !e.includes("401")), [], `no script error (CSP refusals included): ${consoleErrors.join(" | ")}`);
  step("no dialog, no script error, no Content-Security-Policy refusal");
  await desktop.close();
} catch (e) {
  exitCode = 1;
  console.error("console: FAILED:", e && e.stack ? e.stack : e);
  console.error("hookq's last log lines:\n" + logs.slice(-20).join("\n"));
} finally {
  if (browser) await browser.close().catch(() => {});
  hookq.kill("SIGTERM");
  await new Promise((r) => { hookq.once("exit", r); setTimeout(r, 20000); });
  target.close();
}
console.log(`console: ${passed} passed, ${exitCode} failed`);
process.exit(exitCode);
