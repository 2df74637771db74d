#!/usr/bin/env python3
"""The operator dashboard in a real browser: headless Chromium driven by Selenium.

Opens each page of the dashboard mounted in the axum example (seeded by it: tenants, keys,
credits, requests, a dead letter, an alert), checks the figures shown against the SQLite store
the example wrote (read here with Python's sqlite3, not through tollgate), checks that a tenant
id written as markup renders as text, and keeps a screenshot of each page under target/.

Then, over the example filled with a week of 50 tenants' traffic (SEEDED_BASE_URL), opens
every page with no error in the browser's console, and takes the pictures of
docs/dashboard.md (SHOTS_DIR/docs, each PNG at most 200 KB).

Usage: dashboard-browser.py BASE_URL TOKEN DB SHOTS_DIR [CLI_BASE_URL [SEEDED_BASE_URL]]
"""
import os
import sqlite3
import sys
import urllib.error
import urllib.request
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from selenium.webdriver.support.ui import WebDriverWait

base, token, db, shots = sys.argv[1:5]
cli_base = sys.argv[5] if len(sys.argv) > 5 else None
seeded_base = sys.argv[6] if len(sys.argv) > 6 else None
PICTURE_MAX_BYTES = 200 * 1024
HOSTILE = "<script>alert(1)</script>"
# The example's tenant of the configuration file: its id and customers are markup.
FILE_HOSTILE = "<img/src=x/onerror=alert(2)>"
FILE_CUSTOMER = "cus_<b>file</b>"
passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='tollgate-chromium-')}")
    # The console, read after each page of the week: a CSP violation or a script error is logged.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shot(driver, name):
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1200, min(max(height + 40, 600), 2400))
    driver.save_screenshot(os.path.join(shots, f"dashboard-{name}.png"))


def sign_in(driver, at):
    driver.get(at + "/")
    check(f"{at}: without the token, the login form and nothing else",
          driver.find_elements(By.NAME, "token") and not driver.find_elements(By.CSS_SELECTOR, "main table"))
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button").click()
    # The form posts, and the answer redirects: wait for the page it leads to (bounded).
    try:
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.outcomes"))
        check(f"{at}: signed in, the overview", True)
    except TimeoutException:
        check(f"{at}: signed in, the overview", False, driver.title)


store = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
used = dict(((t, m), q) for t, m, q in store.execute("SELECT tenant, meter, SUM(quantity) FROM usage GROUP BY tenant, meter"))


# Words of at most 20 characters that a page's cells or headings break across two lines: a
# word's range has one box per line it is on. (Run by the driver: the page itself runs none.)
BROKEN_WORDS = """
const out = [];
for (const el of document.querySelectorAll('th, td, h1, h2, dd, dt, figcaption')) {
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const re = /\\S+/g;
    let m;
    while ((m = re.exec(node.data)) !== null) {
      if (m[0].length > 20) continue;
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
      if (tops.size > 1) out.push(m[0]);
    }
  }
}
return out;
"""


def no_markup(driver, page):
    """No element came from a name: the markup in ids, customers and grant ids is text (a dialog
    opened by one would fail the next call of the driver)."""
    made = driver.find_elements(By.CSS_SELECTOR, "main img, main b, main i, script, [onerror], [onclick]")
    check(f"{page}: no element made from a name's markup", not made, [e.tag_name for e in made])


def no_word_broken(driver, page):
    broken = driver.execute_script(BROKEN_WORDS)
    check(f"{page}: no word broken across lines", not broken, broken[:10])


def used_today(tenant, meter):
    """The daily quota's gauge counts today's usage (UTC), read as the page is."""
    midnight = int(time.time()) // 86400 * 86400
    row = store.execute("SELECT SUM(quantity) FROM usage WHERE tenant = ? AND meter = ? AND window_start >= ?",
                        (tenant, meter, midnight)).fetchone()
    return row[0] or 0


granted = store.execute("SELECT SUM(units) FROM credit WHERE tenant = 'acme' AND closed_at IS NULL").fetchone()[0]
prefixes = [p for (p,) in store.execute("SELECT prefix FROM api_key WHERE tenant = 'acme'")]
dead = store.execute("SELECT COUNT(*) FROM usage WHERE dead IS NOT NULL").fetchone()[0]
pending = store.execute(
    "SELECT COUNT(*) FROM usage WHERE dead IS NULL AND (quantity > exported OR in_flight IS NOT NULL)").fetchone()[0]

driver = browser()
try:
    sign_in(driver, base)
    # The overview: the fleet's tallies as the store holds them (every node's added up), the
    # top tenants by refusals (globex's 4 before the markup tenant's 3, its id as text).
    fleet = dict(store.execute("SELECT outcome, SUM(n) FROM tally WHERE tenant = '' GROUP BY outcome").fetchall())
    day = {r.get_attribute("data-outcome"): r.find_element(By.CSS_SELECTOR, "td.day").text
           for r in driver.find_elements(By.CSS_SELECTOR, "table.outcomes tbody tr")}
    check("overview: requests admitted today, the store's tallies", day.get("admitted") == f"{fleet.get('admitted', 0):,}",
          (day, fleet))
    check("overview: refused for their rate, the example's 3 and 4", day.get("rate") == "7" == str(fleet.get("rate_limited")),
          (day, fleet))
    top = [r.find_element(By.CSS_SELECTOR, "a.tenant").text for r in driver.find_elements(By.CSS_SELECTOR, "table.top.refused tbody tr")]
    check("overview: the most refused first, a markup id as text", top == ["globex", HOSTILE], top)
    check("overview: a chart per minute of the last hour", len(driver.find_elements(By.CSS_SELECTOR, "figure.minutes")) >= 2)
    no_markup(driver, "overview")
    no_word_broken(driver, "overview")
    shot(driver, "overview")
    driver.find_element(By.CSS_SELECTOR, "table.top.refused a.tenant").click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith("globex"))
    today = {r.get_attribute("data-outcome"): r.find_element(By.CSS_SELECTOR, "td.n").text
             for r in driver.find_elements(By.CSS_SELECTOR, "table.today tbody tr")}
    check("overview: a top tenant's link opens its page, its requests today", today.get("rate_limited") == "4", today)

    driver.get(base + "/tenants")
    rows = {r.find_element(By.CSS_SELECTOR, "a.tenant").text: r for r in driver.find_elements(By.CSS_SELECTOR, "table.tenants tbody tr")}
    check("every tenant of the store and the file listed", set(rows) == {"acme", "globex", HOSTILE, FILE_HOSTILE},
          sorted(rows))
    check("a tenant id written as markup renders as text", HOSTILE in rows)
    check("a file tenant's id and customer written as markup render as text",
          FILE_HOSTILE in rows and FILE_CUSTOMER in rows[FILE_HOSTILE].text, rows.get(FILE_HOSTILE) and rows[FILE_HOSTILE].text)
    no_markup(driver, "tenants")
    check("no script element came from the store", not driver.find_elements(By.TAG_NAME, "script"))
    balance = rows["acme"].find_element(By.CSS_SELECTOR, "td.balance").text if "acme" in rows else ""
    left = granted - used.get(("acme", "credits"), 0)
    check("acme's balance as the store holds it", f"credits {left:,} left of {granted:,}" in balance, balance)
    no_word_broken(driver, "tenants")
    shot(driver, "tenants")

    # The filter and the order, chosen in the form (a GET: no script), kept by the headings.
    Select(driver.find_element(By.NAME, "plan")).select_by_value("free")
    Select(driver.find_element(By.NAME, "sort")).select_by_value("refusals")
    driver.find_element(By.CSS_SELECTOR, "form.view button").click()
    WebDriverWait(driver, 20).until(lambda d: "plan=free" in d.current_url)
    listed = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.tenants a.tenant")]
    check("filter by plan: the free tenants only", sorted(listed) == sorted(["globex", HOSTILE]), listed)
    refusals = {r.find_element(By.CSS_SELECTOR, "a.tenant").text: int(r.find_element(By.CSS_SELECTOR, "td.refusals").text)
                for r in driver.find_elements(By.CSS_SELECTOR, "table.tenants tbody tr")}
    check("sort by refusals: the most first (globex's 4 before the id-first markup tenant's 3)",
          listed == ["globex", HOSTILE] and refusals == {"globex": 4, HOSTILE: 3}, (listed, refusals))
    check("the form shows the view in force",
          Select(driver.find_element(By.NAME, "sort")).first_selected_option.get_attribute("value") == "refusals")
    check("the view says what it read", "tenants read match" in driver.find_element(By.CSS_SELECTOR, "p.window").text)
    driver.find_element(By.LINK_TEXT, "plan").click()
    WebDriverWait(driver, 20).until(lambda d: "sort=plan" in d.current_url)
    check("a heading orders by its column and keeps the filter", "plan=free" in driver.current_url, driver.current_url)
    Select(driver.find_element(By.NAME, "state")).select_by_value("active")
    Select(driver.find_element(By.NAME, "plan")).select_by_value("")
    driver.find_element(By.CSS_SELECTOR, "form.view button").click()
    WebDriverWait(driver, 20).until(lambda d: "state=active" in d.current_url)
    states = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "table.tenants td.state")]
    check("filter by state: only that state", states and set(states) == {"active"}, states)
    shot(driver, "tenants-filtered")

    driver.find_element(By.NAME, "q").send_keys(prefixes[0])
    driver.find_element(By.CSS_SELECTOR, "form.search button").click()
    WebDriverWait(driver, 20).until(lambda d: "q=" in d.current_url)
    found = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.tenants a.tenant")]
    check("a key prefix finds its tenant", found == ["acme"], found)
    driver.get(base + "/?q=" + "x" * 8_000)
    check("a search at the old home's address leads to the list", "/tenants?q=" in driver.current_url, driver.current_url)
    check("a huge search string is cut, answered",
          len(driver.find_element(By.NAME, "q").get_attribute("value")) == 128)

    driver.get(base + "/tenants")
    driver.find_element(By.LINK_TEXT, "acme").click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith("acme"))
    values = {g.find_element(By.XPATH, "..").get_attribute("class"): g.find_element(By.CSS_SELECTOR, ".value").text
              for g in driver.find_elements(By.CSS_SELECTOR, ".gauge")}
    check("acme's requests gauge: its usage in the store today",
          values.get("meter-requests") == f"{used_today('acme', 'requests'):,}", values)
    check("acme's credits gauge: its units used",
          values.get("meter-credits") == f"{used[('acme', 'credits')]:,}", values)
    bars = sum(int(r.get_attribute("data-value")) for r in driver.find_elements(By.CSS_SELECTOR, "figure.hourly rect"))
    check("the hourly charts add up to its usage", bars == used[("acme", "requests")] + used[("acme", "credits")], bars)
    keys = [k.text for k in driver.find_elements(By.CSS_SELECTOR, "td.prefix")]
    check("keys by prefix only", keys == [p + "…" for p in prefixes], keys)
    check("no key of the store in the page", "tg_live_" not in driver.page_source.replace(prefixes[0], ""))
    grants = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "table.grants tbody td:nth-child(2)")]
    check("a grant id with quotes and markup, as text", "g\"'><b>q</b>" in grants, grants)
    no_markup(driver, "tenant")
    no_word_broken(driver, "tenant")
    shot(driver, "tenant")

    driver.get(base + "/tenants")
    driver.find_element(By.LINK_TEXT, HOSTILE).click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith(HOSTILE))
    check("the markup tenant's page titles it as text", driver.find_element(By.TAG_NAME, "h1").text == HOSTILE)
    no_markup(driver, "the markup tenant's page")
    refusals = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "table.rejections td")]
    check("its refusals on this node, by kind", refusals == ["rate_limited", "3"], refusals)

    driver.get(base + "/tenants")
    driver.find_element(By.LINK_TEXT, FILE_HOSTILE).click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith(FILE_HOSTILE))
    check("the file's markup tenant's page titles it as text", driver.find_element(By.TAG_NAME, "h1").text == FILE_HOSTILE)
    check("its customers as text", FILE_CUSTOMER in driver.find_element(By.CSS_SELECTOR, "dd.customer").text
          and "m_<i>file</i>" in driver.find_element(By.CSS_SELECTOR, "section.facts").text)
    no_markup(driver, "the file's markup tenant's page")

    driver.get(base + "/tenants/nobody")
    check("an unknown tenant: not found", "Not found" in driver.title)

    driver.get(base + "/")
    driver.find_element(By.LINK_TEXT, "Plans").click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith("Plans"))
    shown = {(r.find_elements(By.TAG_NAME, "td")[0].text, r.find_elements(By.TAG_NAME, "td")[1].text):
             r.find_elements(By.TAG_NAME, "td")[2].text
             for r in driver.find_elements(By.CSS_SELECTOR, "table.plans tbody tr")}
    counted = {}
    for (plan,) in store.execute("SELECT plan FROM tenant"):
        name, _, version = plan.partition("@")
        key = (name, version or "1")
        counted[key] = counted.get(key, 0) + 1
    check("plans: the tenants on each version, as the store holds them",
          all(shown.get(k) == str(n) for k, n in counted.items()) and counted, (shown, counted))
    no_word_broken(driver, "plans")
    no_markup(driver, "plans")
    shot(driver, "plans")

    # Refresh without script: the page reloads itself (a <meta> refresh) and says when it read.
    driver.get(base + "/billing")
    first = driver.find_element(By.CSS_SELECTOR, "header .asof").text
    check("every page says when it was read", first.startswith("as of "), first)
    driver.find_element(By.CSS_SELECTOR, "header a.refresh").click()
    WebDriverWait(driver, 20).until(lambda d: "refresh=on" in d.current_url)
    marked = driver.find_element(By.CSS_SELECTOR, "header .asof")
    try:
        # Waits for the reload (10 s), never racing it: the element of the old page goes stale.
        WebDriverWait(driver, 40).until(lambda d: d.find_element(By.CSS_SELECTOR, "header .asof").id != marked.id)
        check("refresh: the page reloaded itself, no script", not driver.find_elements(By.TAG_NAME, "script"))
    except TimeoutException:
        check("refresh: the page reloaded itself", False, "no reload within 40 s")
    driver.find_element(By.CSS_SELECTOR, "header a.refresh").click()
    WebDriverWait(driver, 20).until(lambda d: "refresh=on" not in d.current_url)
    check("refresh: stopped", not driver.find_elements(By.CSS_SELECTOR, "meta[http-equiv=refresh]"))

    driver.get(base + "/billing")
    check("billing: the sink", driver.find_element(By.CSS_SELECTOR, ".sink").text == "jsonl")
    shown = len(driver.find_elements(By.CSS_SELECTOR, "table.pending tbody tr"))
    check("billing: the windows pending export", shown == pending, (shown, pending))
    reasons = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "table.dead td.reason")]
    check("billing: the dead letter, its reason as text", reasons == ["refused: <b>No such customer</b>"] and dead == 1, reasons)
    no_word_broken(driver, "billing")
    no_markup(driver, "billing")
    shot(driver, "billing")

    # Money: acme's balance (its plan's one money), linked to its page; no free tenant listed.
    driver.get(base + "/")
    driver.find_element(By.LINK_TEXT, "Money").click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith("Money"))
    balances = {r.find_element(By.CSS_SELECTOR, "a.tenant").text: r.find_element(By.CSS_SELECTOR, "td.left").text
                for r in driver.find_elements(By.CSS_SELECTOR, "table.balances tbody tr")
                if r.find_elements(By.CSS_SELECTOR, "a.tenant")}
    check("money: acme's balance left, as the store holds it", balances == {"acme": f"{left:,}"}, balances)
    check("money: a free tenant is in no table", not driver.find_elements(By.LINK_TEXT, "globex"))
    spenders = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.spend a.tenant")]
    check("money: the file's markup tenant, on a capped plan, its id as text", spenders == [FILE_HOSTILE], spenders)
    no_markup(driver, "money")
    no_word_broken(driver, "money")
    shot(driver, "money")
    driver.find_element(By.CSS_SELECTOR, "table.balances a.tenant").click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith("acme"))
    check("money: a row's link opens its tenant's page", driver.find_element(By.TAG_NAME, "h1").text == "acme")

    driver.get(base + "/alerts")
    rows = driver.find_elements(By.CSS_SELECTOR, "table.pending tbody tr")
    check("alerts: the pending alert", len(rows) == 1)
    check("alerts: a destination's query (a receiver's token) is not shown", "secret" not in driver.page_source)
    no_word_broken(driver, "alerts")
    no_markup(driver, "alerts")
    shot(driver, "alerts")

    # The audit: the seed's changes, by its operator (a name of markup), newest first.
    driver.get(base + "/")
    driver.find_element(By.LINK_TEXT, "Audit").click()
    WebDriverWait(driver, 20).until(lambda d: d.title.startswith("Audit"))
    cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")]
             for r in driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr")]
    who = {c[2] for c in cells if len(c) == 6}
    check("audit: the seed's changes, by its operator, the name as text",
          "operator:seed\"'><b>ops</b>" in who, who)
    issued = [c for c in cells if len(c) == 6 and c[1] == HOSTILE and c[3] == "key"]
    check("audit: the markup tenant's keys, its id as text", issued, cells[:4])
    check("audit: a key is named by its id, never the key",
          all(" prefix=tg_live_" in c[5] and len(c[5].split()[1]) <= len("prefix=tg_live_") + 4 for c in issued), issued)
    no_markup(driver, "audit")
    no_word_broken(driver, "audit")
    shot(driver, "audit")
    driver.find_element(By.CSS_SELECTOR, "table.audit a.tenant").click()
    WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "section.facts"))
    check("audit: a row's tenant opens its page, with its changes",
          driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr"))

    driver.get(base + "/node")
    check("node: the store answers", len(driver.find_elements(By.CSS_SELECTOR, "table.health td.ok")) == 3)
    stats = {r.get_attribute("data-field"): r.find_elements(By.TAG_NAME, "td")[1].text
             for r in driver.find_elements(By.CSS_SELECTOR, "table.stats tr")}
    check("node: its stats", stats.get("tracked_tenants") == "3", stats.get("tracked_tenants"))
    groups = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "main h2")]
    check("node: counters grouped under headings", "Usage pipeline" in groups and "Webhooks" in groups, groups)
    no_word_broken(driver, "node")
    no_markup(driver, "node")
    shot(driver, "node")

    if cli_base:
        sign_in(driver, cli_base)
        driver.get(cli_base + "/tenants")
        listed = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.tenants a.tenant")]
        check("tollgate dashboard: the same tenants", sorted(listed) == sorted(["acme", "globex", HOSTILE, FILE_HOSTILE]),
              listed)
        driver.get(cli_base + "/node")
        check("tollgate dashboard: no node page without an engine", "Not found" in driver.title)
        driver.get(cli_base + "/")
        session = driver.get_cookie("tollgate_dashboard")
        check("the session cookie: HttpOnly, SameSite=Strict, not Secure over plain HTTP",
              session and session.get("httpOnly") and session.get("sameSite") == "Strict" and not session.get("secure"),
              session)
        driver.find_element(By.CSS_SELECTOR, "form.signout button").click()
        WebDriverWait(driver, 20).until(lambda d: d.title.startswith("Sign in"))
        check("sign out: the browser forgets the session", driver.get_cookie("tollgate_dashboard") is None)
        driver.get(cli_base + "/")
        check("sign out: the next page asks for the token", driver.find_elements(By.NAME, "token"))
        request = urllib.request.Request(cli_base + "/", headers={"Cookie": f"tollgate_dashboard={session['value']}"})
        try:
            status = urllib.request.urlopen(request).status
        except urllib.error.HTTPError as e:
            status = e.code
        check("sign out: the session's cookie, shown again, opens nothing", status == 401, status)

    if seeded_base:
        # The week of 50 tenants: every page without a console error, and the pictures.
        pictures = os.path.join(shots, "docs")
        os.makedirs(pictures, exist_ok=True)
        # Cookies are the host's, whatever the port: start signed out.
        driver.get(seeded_base + "/")
        driver.delete_all_cookies()
        sign_in(driver, seeded_base)
        driver.get_log("browser")  # the login page's own 401, drained

        def picture(path, name, height=1300):
            driver.set_window_size(1200, 1000)
            driver.get(seeded_base + path)
            errors = [e["message"] for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
            check(f"week: {name}: no error in the console", not errors, errors[:3])
            full = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1200, min(full + 40, height))
            file = os.path.join(pictures, f"dashboard-{name}.png")
            driver.save_screenshot(file)
            size = os.path.getsize(file)
            check(f"week: {name}: its picture is at most 200 KB", size <= PICTURE_MAX_BYTES, size)

        picture("/", "overview", 1800)
        bars = [int(r.get_attribute("data-value")) for r in driver.find_elements(By.CSS_SELECTOR, "figure.hours rect")]
        check("week: the overview's day has requests in most hours", sum(1 for b in bars if b > 0) >= 20, bars[:24])
        picture("/tenants", "tenants")
        rows = driver.find_elements(By.CSS_SELECTOR, "table.tenants tbody tr")
        check("week: the first page of 25 tenants", len(rows) == 25, len(rows))
        picture("/tenants?sort=state", "tenants-sorted")
        states = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "table.tenants td.state")]
        check("week: some tenants' balance is empty, listed first", states and states[0] == "balance empty", states[:5])
        picture("/tenants/northwind", "tenant", 1700)
        bars = driver.find_elements(By.CSS_SELECTOR, "figure.chart.hourly rect")
        check("week: a tenant's hourly chart has a bar per hour of usage", len(bars) >= 24, len(bars))
        picture("/money", "money")
        spent = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "table.spend td.spent")]
        check("week: the teams' spend against their caps, in dollars", spent and all(s.endswith(" USD") for s in spent), spent)
        # The team past its cap first, at most at it (what the node keeps unspent is not spent).
        first = driver.find_element(By.CSS_SELECTOR, "table.spend td.spent").text.removesuffix(" USD")
        check("week: the team past its cap first, at its cap", 4.90 <= float(first) <= 5.00, spent[:3])
        # Every row's tenant link opens a page (no dead link from the money page).
        links = {a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "main a.tenant")}
        opened = 0
        for href in sorted(links):
            driver.get(href)
            opened += driver.find_elements(By.CSS_SELECTOR, "section.facts") != []
        check("week: every tenant linked from the money page opens", links and opened == len(links), (opened, len(links)))
        picture("/audit", "audit", 1000)
        moved = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr") if "spend-cap" in r.text]
        check("week: a team's lowered cap, by its operator", any("operator:ana@ops" in m and "4.5 hard" in m for m in moved),
              moved)
        for path, name in [("/plans", "plans"), ("/billing", "billing"), ("/alerts", "alerts"), ("/node", "node")]:
            picture(path, name)
finally:
    driver.quit()

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
