// The dashboard's page script: fills the server-rendered page from /dashboard/api/* and keeps
// it live by polling every few seconds (paused while the tab is hidden). No framework; the
// chart is uPlot. Money arrives as {exact, shown}: the page shows `shown` and puts the exact
// figure in the title, so hovering shows every digit. Nothing here handles a key: the
// session cookie is HttpOnly and the API takes only that cookie.
(function () {
  "use strict";

  const main = document.getElementById("main");
  const view = main.dataset.view;
  const refreshMs = Number(main.dataset.refresh || 2) * 1000;
  const tenant = main.dataset.tenant || null; // set when an operator looks at one tenant
  const liveLabel = document.getElementById("live");
  const $ = (id) => document.getElementById(id);
  let lastOk = 0;

  function query(params) {
    const p = new URLSearchParams();
    if (tenant) p.set("tenant_id", tenant);
    for (const [k, v] of Object.entries(params || {})) if (v) p.set(k, v);
    const s = p.toString();
    return s ? "?" + s : "";
  }

  async function api(path, params) {
    const response = await fetch("/dashboard/api/" + path + query(params), {
      credentials: "same-origin",
      cache: "no-store",
      headers: { accept: "application/json" },
    });
    if (response.status === 401) {
      location.assign("/dashboard"); // the session ended: back to the sign-in form
      throw new Error("signed out");
    }
    if (!response.ok) throw new Error(path + " answered " + response.status);
    lastOk = Date.now();
    return response.json();
  }

  function setMoney(el, m) {
    el.textContent = m.shown;
    el.title = m.exact + " USD";
    el.dataset.exact = m.exact;
  }

  function td(content, cls) {
    const cell = document.createElement("td");
    if (cls) cell.className = cls;
    if (content instanceof Node) cell.appendChild(content);
    else cell.textContent = content == null ? "" : String(content);
    return cell;
  }

  function moneyTd(m) {
    const span = document.createElement("span");
    span.className = "money";
    setMoney(span, m);
    return td(span, "num");
  }

  const int = (n) => Number(n).toLocaleString("en-US");
  const when = (iso) => iso.replace("T", " ").replace(/(\.\d+)?(\+00:00|Z)$/, "");
  const whenShort = (iso) => when(iso).slice(5); // "12-03 00:32:32": the year is implied

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function gauge(el, shares) {
    const fills = el.querySelectorAll(".fill");
    shares.forEach((share, i) => {
      if (fills[i]) fills[i].style.width = ((share || 0) * 100).toFixed(1) + "%";
    });
  }

  // Run `task` every `ms` (first now, with `now`) while the page is visible; at once when the
  // page shows again after being hidden. At most one timer is pending and one run in flight:
  // a tab hidden and shown again while a run awaits the network must not start a second loop.
  function every(ms, task, now) {
    let timer = null;
    let running = false;
    const schedule = () => {
      clearTimeout(timer);
      timer = document.hidden ? null : setTimeout(run, ms); // hidden: the next show runs it
    };
    const run = async () => {
      clearTimeout(timer);
      timer = null;
      if (running || document.hidden) return;
      running = true;
      try {
        await task();
      } catch (err) {
        console.warn(err);
      } finally {
        running = false;
      }
      schedule();
    };
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) {
        clearTimeout(timer);
        timer = null;
      } else if (!running) run(); // while one is in flight, it schedules the next itself
    });
    if (now) run();
    else schedule();
  }

  function showLive() {
    if (!liveLabel) return;
    const age = Date.now() - lastOk;
    const stale = !lastOk || age > refreshMs * 3;
    liveLabel.classList.toggle("stale", stale);
    liveLabel.textContent = stale
      ? "not updating: retrying…"
      : "live · updated " + new Date(lastOk).toLocaleTimeString();
  }
  setInterval(showLive, 1000);

  // -- a tenant's page ---------------------------------------------------------------------

  function tenantPage() {
    // Ids on the newest page as last drawn (null: not drawn yet), to mark the rows new since.
    // Only the rows on show: a set of every id ever shown grows for as long as the page is open.
    let seen = null;
    const pages = [null]; // cursors of the pages walked (null: the newest)
    let chart = null;

    async function overview() {
      const o = await api("overview");
      setMoney($("month-total"), o.month);
      $("month-requests").textContent = int(o.month.requests);
      setMoney($("today-total"), o.today);
      $("today-requests").textContent = int(o.today.requests);
      const b = o.balance;
      setMoney($("available"), b.available);
      if (b.prepaid) {
        const balance = document.createElement("span");
        balance.className = "money";
        setMoney(balance, b.balance);
        const held = document.createElement("span");
        held.className = "money";
        setMoney(held, b.held);
        $("balance-detail").replaceChildren("balance ", balance, " · reserved ", held);
        gauge($("balance-gauge"), [b.held_share]);
      }
      const budget = b.key_budget || b.budget;
      const remaining = $("budget-remaining");
      if (budget) {
        const span = document.createElement("span");
        span.className = "money";
        setMoney(span, budget.remaining);
        const left = document.createElement("span");
        left.className = "muted small";
        left.textContent = " left";
        remaining.replaceChildren(span, left);
        $("budget-detail").textContent =
          "spent " + budget.spent.shown + " of " + budget.limit.shown +
          (b.key_budget ? " (this key)" : "") + (budget.hard ? "" : " (soft)");
        gauge($("budget-gauge"), [budget.spent_share, (budget.used_share || 0) - (budget.spent_share || 0)]);
      }
      showLive();
    }

    async function series() {
      const step = $("chart-step").value;
      const window_ = $("chart-window").value;
      const s = await api("series", { step: step, window: window_ });
      const xs = s.points.map((p) => p.t);
      const ys = s.points.map((p) => Number(p.exact)); // drawing only: the figures stay exact
      const total = s.points.reduce((n, p) => n + p.requests, 0);
      $("chart-summary").textContent =
        int(total) + " requests in the last " + (window_ === "24h" ? "24 hours" : "30 days") +
        ", by " + step + " (UTC).";
      const box = $("chart");
      const width = Math.max(280, box.clientWidth);
      if (chart && chart._step === step + window_) {
        chart.setData([xs, ys]);
        return;
      }
      if (chart) chart.destroy();
      chart = new uPlot(
        {
          width: width,
          height: 240,
          tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
          legend: { live: true },
          cursor: { drag: { x: false, y: false } },
          scales: { x: { time: true } },
          axes: [
            {},
            { size: 70, values: (u, vals) => vals.map((v) => "$" + v.toPrecision(3).replace(/\.?0+$/, "")) },
          ],
          series: [
            {},
            {
              label: "Spend (USD)",
              stroke: "#0b5cad",
              fill: "rgba(11, 92, 173, 0.25)",
              paths: uPlot.paths.bars({ size: [0.8, 40] }),
              points: { show: false },
              value: (u, v) => (v == null ? "" : "$" + v.toFixed(6)),
            },
          ],
        },
        [xs, ys],
        box
      );
      chart._step = step + window_;
    }

    function barRow(r) {
      const name = document.createElement("span");
      name.textContent = r.label;
      name.title = r.name || r.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const inner = document.createElement("span");
      inner.style.width = ((r.share || 0) * 100).toFixed(1) + "%";
      bar.appendChild(inner);
      const first = td(name, "name");
      first.appendChild(bar);
      const tr = document.createElement("tr");
      tr.append(first, td(int(r.requests), "num"), moneyTd(r));
      return tr;
    }

    function options(select, rows) {
      const chosen = select.value;
      const keep = [select.options[0]];
      for (const r of rows) {
        if (!r.name) continue;
        const o = document.createElement("option");
        o.value = r.name;
        o.textContent = r.label;
        keep.push(o);
      }
      select.replaceChildren(...keep);
      select.value = chosen;
      if (select.value !== chosen) select.value = "";
    }

    async function breakdowns() {
      const [models, keys] = await Promise.all([
        api("breakdown", { by: "model" }),
        api("breakdown", { by: "api_key" }),
      ]);
      fill($("by-model").tBodies[0], models.rows.map(barRow));
      fill($("by-key").tBodies[0], keys.rows.map(barRow));
      options($("tx-model"), models.rows);
      options($("tx-key"), keys.rows);
    }

    function filters() {
      return {
        model: $("tx-model").value,
        api_key_id: $("tx-key").value,
        since: $("tx-since").value,
      };
    }

    async function transactions() {
      const cursor = pages[pages.length - 1];
      const newest = pages.length === 1;
      const page = await api("transactions", Object.assign({ cursor: cursor }, filters()));
      const highlight = newest && seen !== null; // not on the first draw, nor on older pages
      const rows = page.transactions.map((t) => {
        const tr = document.createElement("tr");
        tr.tabIndex = 0;
        tr.dataset.requestId = t.request_id;
        tr.setAttribute("aria-label", "Details of request " + t.request_id);
        if (highlight && !seen.has(t.request_id)) tr.className = "fresh";
        tr.append(
          td(whenShort(t.occurred_at)),
          td(t.model, "name"),
          td(t.api_key_id || "", "name hide-narrow"),
          td(int(t.prompt_tokens), "num hide-narrow"),
          td(int(t.completion_tokens), "num hide-narrow"),
          moneyTd(t)
        );
        return tr;
      });
      fill($("transactions").tBodies[0], rows);
      if (newest) seen = new Set(page.transactions.map((t) => t.request_id));
      $("tx-older").disabled = !page.next_cursor;
      $("tx-older").dataset.cursor = page.next_cursor || "";
      $("tx-newest").disabled = pages.length === 1;
      $("tx-page").textContent = "page " + pages.length;
    }

    async function detail(requestId) {
      const d = await api("transactions/" + encodeURIComponent(requestId));
      const dl = document.createElement("dl");
      dl.className = "detail";
      const add = (label, value) => {
        const dt = document.createElement("dt");
        dt.textContent = label;
        const dd = document.createElement("dd");
        if (value && typeof value === "object" && "shown" in value) {
          dd.textContent = value.exact + " USD";
        } else dd.textContent = value == null ? "—" : String(value);
        dl.append(dt, dd);
      };
      add("Request", d.request_id);
      add("When", when(d.occurred_at));
      add("Model", d.model + (d.provider_model_id !== d.model ? " (" + d.provider_model_id + ")" : ""));
      add("Provider", d.provider);
      add("API key", d.api_key_id);
      add("Usage from", d.usage_source);
      add("Prompt tokens", int(d.prompt_tokens));
      add("of which cached (read)", int(d.cache_read_tokens));
      add("cache writes", int(d.cache_write_tokens) + (d.cache_write_1h_tokens ? " (+" + int(d.cache_write_1h_tokens) + " 1 h)" : ""));
      add("Completion tokens", int(d.completion_tokens));
      add("of which reasoning", int(d.reasoning_tokens));
      if (d.web_search_requests) add("Web searches", d.web_search_requests);
      if (d.images) add("Images", d.images);
      for (const c of ["prompt_cost", "cache_read_cost", "cache_write_cost", "completion_cost", "internal_reasoning_cost", "request_cost", "web_search_cost", "image_cost"]) {
        if (d[c] && d[c].exact !== "0") add(c.replace(/_/g, " "), d[c]);
      }
      add("Total", d.total_cost);
      add("Reported by upstream", d.reported_cost);
      add("Price version", d.price_version);
      add("Revision", d.revision);
      for (const r of d.revisions) {
        add("Revision " + r.from + " → " + r.to, r.old_total.exact + " → " + r.new_total.exact + " USD (" + r.reason + ", price version " + r.price_version + ")");
      }
      $("tx-detail-title").textContent = "Request " + d.request_id;
      $("tx-detail-body").replaceChildren(dl);
      $("tx-detail").showModal();
    }

    async function invoices() {
      const list = await api("invoices");
      const rows = list.invoices.map((i) => {
        const links = document.createElement("span");
        for (const [format, href] of Object.entries(i.links)) {
          const a = document.createElement("a");
          a.href = href;
          a.textContent = format.toUpperCase();
          if (format === "pdf") a.setAttribute("download", i.number + ".pdf");
          links.append(a, document.createTextNode(" "));
        }
        const tr = document.createElement("tr");
        tr.append(td(i.number), td(i.period), moneyTd(i.amount_due), td(links));
        return tr;
      });
      fill($("invoices").tBodies[0], rows);
      $("invoices-empty").hidden = rows.length > 0;
    }

    $("transactions").addEventListener("click", (e) => {
      const tr = e.target.closest("tr[data-request-id]");
      if (tr) detail(tr.dataset.requestId);
    });
    $("transactions").addEventListener("keydown", (e) => {
      const tr = e.target.closest("tr[data-request-id]");
      if (tr && (e.key === "Enter" || e.key === " ")) {
        e.preventDefault();
        detail(tr.dataset.requestId);
      }
    });
    $("tx-older").addEventListener("click", () => {
      pages.push($("tx-older").dataset.cursor);
      transactions();
    });
    $("tx-newest").addEventListener("click", () => {
      pages.length = 1;
      transactions();
    });
    $("tx-filters").addEventListener("change", () => {
      pages.length = 1;
      seen = null;
      transactions();
    });
    $("tx-filters").addEventListener("submit", (e) => e.preventDefault());
    for (const id of ["chart-step", "chart-window"]) $(id).addEventListener("change", series);
    window.addEventListener("resize", () => {
      if (chart) chart.setSize({ width: Math.max(280, $("chart").clientWidth), height: 240 });
    });

    // First view: every panel at once; then the live parts every refresh.
    const first = Promise.all([overview(), series(), breakdowns(), transactions(), invoices()]);
    first.finally(() => {
      document.body.dataset.ready = "1";
      every(refreshMs, async () => {
        await overview();
        if (pages.length === 1) await transactions(); // the newest page only
      });
      every(Math.max(refreshMs * 5, 10000), () => Promise.all([series(), breakdowns()]));
    });
  }

  // -- the operator's page -----------------------------------------------------------------

  function operatorPage() {
    async function tenants() {
      const t = await api("operator/tenants");
      setMoney($("all-month"), t.month_total);
      $("tenant-count").textContent = t.tenants.length + " tenants this month";
      $("rate-requests").textContent = t.rate.requests_per_minute;
      setMoney($("rate-spend"), t.rate.cost_per_minute);
      fill(
        $("tenants").tBodies[0],
        t.tenants.map((r) => {
          const a = document.createElement("a");
          a.href = "/dashboard/tenants/" + encodeURIComponent(r.tenant_id);
          a.textContent = r.tenant_id;
          const tr = document.createElement("tr");
          tr.dataset.tenant = r.tenant_id;
          tr.append(
            td(a, "name"),
            moneyTd(r.month),
            moneyTd(r.today),
            td(int(r.requests), "num"),
            td(r.requests_per_minute, "num"),
            moneyTd(r.cost_per_minute)
          );
          return tr;
        })
      );
      showLive();
    }

    const mb = (bytes) => (bytes == null ? "—" : (bytes / 1048576).toFixed(0) + " MiB");

    async function pipeline() {
      const p = await api("operator/pipeline");
      const down = p.services.filter((s) => !s.up).length;
      $("pipeline-state").textContent = !p.configured
        ? "not probed"
        : down
          ? down + " down"
          : "all up";
      $("pipeline-state").className = "big " + (down ? "state-down" : "state-up");
      $("pipeline-note").textContent =
        "broker " + p.broker + " · " + int(p.dead_lettered) + " dead-lettered";
      fill(
        $("services").tBodies[0],
        p.services.map((s) => {
          const state = document.createElement("span");
          state.className = s.up ? "state-up" : "state-down";
          state.textContent = s.up ? "up" : "down (" + s.error + ")";
          const tr = document.createElement("tr");
          tr.append(
            td(s.name),
            td(state),
            td(s.lag_seconds == null ? "—" : s.lag_seconds.toFixed(2) + " s", "num"),
            td(s.processed == null ? "—" : int(s.processed), "num"),
            td(int(s.dead_lettered), "num"),
            td(mb(s.memory_bytes), "num")
          );
          return tr;
        })
      );
      $("pipeline-extra").textContent =
        (p.configured ? "" : "Set BILLING_PIPELINE_METRICS to probe the services (billing up does). ") +
        "Waiting in this gateway's spools for the broker: " + int(p.spool_bytes) + " bytes. Lag: seconds from an event's recording to the service handling it, as each service last reported it.";
      fill(
        $("unpriced").tBodies[0],
        p.unpriced.map((u) => {
          const tr = document.createElement("tr");
          tr.append(td(u.model, "name"), td(int(u.requests), "num"), td(when(u.oldest)));
          return tr;
        })
      );
    }

    async function drift() {
      const d = await api("operator/drift");
      const c = d.counts;
      $("drift").textContent = c.with_reported_cost
        ? int(c.within_tolerance) + " of " + int(c.with_reported_cost) +
          " requests with a reported cost within $" + d.tolerance + "; computed − reported = " +
          d.sums.difference + " USD over " + int(c.transactions) + " requests."
        : int(c.transactions) + " requests in the last hour, none with a cost reported by the upstream.";
    }

    async function changes() {
      const ch = await api("operator/changes");
      fill(
        $("corrections").tBodies[0],
        ch.corrections.map((r) => {
          const tr = document.createElement("tr");
          tr.append(td(r.model, "name"), td(when(r.effective_from)), td(r.reason, "name"));
          return tr;
        })
      );
      fill(
        $("runs").tBodies[0],
        ch.reprice_runs.map((r) => {
          const tr = document.createElement("tr");
          tr.append(
            td(when(r.started_at)),
            td(r.reason, "name"),
            td(int(r.emitted), "num"),
            td(r.applied_at ? when(r.applied_at) : "pending")
          );
          return tr;
        })
      );
    }

    const first = Promise.all([tenants(), pipeline(), changes()]);
    first.finally(() => {
      document.body.dataset.ready = "1";
      every(refreshMs, () => Promise.all([tenants(), pipeline()]));
      every(30000, changes);
      every(60000, drift, true);
    });
  }

  if (view === "tenant") tenantPage();
  else if (view === "operator") operatorPage();
})();
