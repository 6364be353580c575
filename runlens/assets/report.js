/* runlens HTML report viewer. Inlined into the page by runlens/report/html.py.
 *
 * Reads the JSON block #runlens-data (built by runlens.plotdata) and draws it with Plotly.
 * Strings from the run (layer, metric, config names) are untrusted: DOM text goes through
 * textContent only, and text handed to Plotly (which understands a little HTML) goes
 * through ptext(), which turns < > & into entities that Plotly shows literally.
 */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("runlens-data").textContent);
  const RUNS = DATA.runs;
  const UNIT = DATA.x_axis === "epoch" ? "epoch" : "step";  // what the x axis counts
  const MULTI = RUNS.length > 1;
  const CONFIG = {
    displaylogo: false, responsive: true, showLink: false, showSendToCloud: false,
    showEditInChartStudio: false, modeBarButtonsToRemove: ["select2d", "lasso2d"],
  };
  const COLORS = ["#1570ef", "#dc6803", "#079455", "#7a5af8", "#d92d20", "#0e9384",
    "#c11574", "#475467", "#b54708", "#6172f3"];
  const BAND = "rgba(217,45,32,0.16)";
  const curvePlots = [];   // divs with a step x axis: they get the finding's band
  let selected = null;     // index into DATA.findings
  let heat = null;         // {div, run, key}

  // -- small helpers ------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function ptext(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function num(v) { return typeof v === "number" && isFinite(v); }
  function fmt(x) {
    if (!num(x)) return x === null || x === undefined ? "-" : String(x);
    const a = Math.abs(x);
    if (x === 0) return "0";
    return a >= 1e5 || a < 1e-3 ? x.toExponential(2) : String(Number(x.toPrecision(4)));
  }
  function color(i) { return COLORS[i % COLORS.length]; }
  function runLabel(i) { return RUNS[i].label || RUNS[i].name; }
  function section(parent, title) {
    const card = el("section", "card");
    card.appendChild(el("h2", null, title));
    parent.appendChild(card);
    return card;
  }
  function plotDiv(parent, cls) {
    const d = el("div", "plot" + (cls ? " " + cls : ""));
    parent.appendChild(d);
    return d;
  }

  // -- smoothing: runlens.series.ema_debiased, step for step ---------------------------
  // state_t = w * state_{t-1} + (1 - w) * x_t over the finite points (state_0 = 0), divided
  // by 1 - w^t; non-finite points pass through; a constant series is returned as is.
  function emaDebiased(values, w) {
    const out = values.slice();
    const fin = values.filter(num);
    if (fin.length === 0 || fin.every((v) => v === fin[0])) return out;
    if (w >= 1) { for (let i = 0; i < out.length; i++) if (num(out[i])) out[i] = 0; return out; }
    let state = 0, k = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (!num(v)) continue;
      state = w * state + (1 - w) * v;
      k += 1;
      out[i] = w > 0 ? state / (1 - Math.pow(w, k)) : state;
    }
    return out;
  }
  window.runlensEma = emaDebiased;  // exposed for the browser test

  function smoothed(ema, w) {
    // Bucket means (bucket > 1) keep the per-step time constant with weight w^bucket.
    const weight = ema.bucket > 1 ? Math.pow(w, ema.bucket) : w;
    const vals = ema.values.map((v) => (v === null ? NaN : v));
    return emaDebiased(vals, weight).map((v) => (num(v) ? v : null));
  }

  // -- traces ---------------------------------------------------------------------------
  function rawTrace(s, name, col, opacity) {
    return { type: "scatter", mode: "lines", x: s.steps, y: s.values, name: ptext(name),
      line: { color: col, width: 1 }, opacity: opacity, hovertemplate: "%{y:.4g} @ %{x}" };
  }
  function nonfiniteTrace(s, name, col, yAt) {
    const nf = s.nonfinite;
    if (!nf || !nf.steps.length) return null;
    return { type: "scatter", mode: "markers", x: nf.steps, y: nf.steps.map(() => yAt),
      name: ptext(name + " NaN/Inf (" + nf.count + ")"),
      text: nf.kinds, hovertemplate: "%{text} at step %{x}<extra></extra>",
      marker: { symbol: "x", size: 9, color: col, line: { width: 2, color: "#d92d20" } } };
  }
  function topOf(list) {
    let hi = -Infinity;
    for (const s of list) for (const v of s.values) if (num(v) && v > hi) hi = v;
    return hi === -Infinity ? 0 : hi;
  }
  function baseLayout(ytitle, extra) {
    return Object.assign({
      margin: { l: 60, r: 20, t: 30, b: 40 }, hovermode: "x unified",
      xaxis: { title: { text: UNIT }, zeroline: false },
      yaxis: { title: { text: ptext(ytitle) }, zeroline: false },
      legend: { orientation: "h", x: 0, y: 1, yanchor: "bottom" }, shapes: [],
    }, extra || {});
  }
  function draw(div, traces, layout) {
    Plotly.newPlot(div, traces.filter((t) => t), layout, CONFIG);
  }

  // A plot of named series from each run; smoothing applied where a series has `ema`.
  function seriesPlot(parent, names, ytitle, opts) {
    const traces = [];
    const present = [];
    RUNS.forEach((run, r) => {
      names.forEach((name, k) => {
        const s = run.series[name];
        if (!s) return;
        present.push(s);
        const col = MULTI ? color(r) : color(k);
        const label = (MULTI ? runLabel(r) + " · " : "") + name;
        const hasEma = !!s.ema && opts.smooth;
        traces.push(rawTrace(s, label + (hasEma ? " (raw)" : ""), col, hasEma ? 0.3 : 1));
        if (hasEma) {
          traces.push({ type: "scatter", mode: "lines", x: s.ema.steps, y: [], name: ptext(label),
            line: { color: col, width: 2 }, hovertemplate: "%{y:.4g} @ %{x}", _ema: s.ema });
        }
      });
    });
    if (!present.length) return null;
    const top = topOf(present);
    RUNS.forEach((run, r) => names.forEach((name, k) => {
      const s = run.series[name];
      if (s) traces.push(nonfiniteTrace(s, (MULTI ? runLabel(r) + " · " : "") + name,
        MULTI ? color(r) : color(k), top));
    }));
    const div = plotDiv(parent);
    const layout = baseLayout(ytitle);
    if (opts.log) layout.yaxis.type = "log";
    // A constant series (e.g. a fixed LR of 1e-3) gets Plotly's default +-1 range, which
    // draws it at "0": give it a range around its own value instead.
    const vals = present.flatMap((s) => s.values.filter((v) => v !== null && isFinite(v)));
    if (vals.length && vals.every((v) => v === vals[0]) && !opts.log) {
      const v = vals[0], pad = Math.abs(v) * 0.5 || 1;
      layout.yaxis.range = [v - pad, v + pad];
    }
    div._traces = traces.filter((t) => t);
    applySmoothing(div, currentSmoothing());
    draw(div, div._traces, layout);
    curvePlots.push(div);
    return div;
  }
  function applySmoothing(div, w) {
    for (const t of div._traces) if (t._ema) t.y = smoothed(t._ema, w);
  }
  function wantsLog(names) {
    let lo = Infinity, hi = -Infinity;
    for (const run of RUNS) for (const n of names) {
      const s = run.series[n];
      if (!s) continue;
      for (const v of s.values) if (num(v)) { if (v <= 0) return false; lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    return hi > 0 && lo > 0 && hi / lo > 100;
  }

  // -- header, findings ---------------------------------------------------------------------
  function header() {
    const h = document.querySelector("header");
    h.appendChild(el("h1", null, DATA.title));
    h.appendChild(el("div", "verdict " + (DATA.verdict.severity || "ok"), DATA.verdict.text));
    const dl = el("dl", "facts");
    for (const [k, v] of DATA.facts) {
      const d = el("div");
      d.appendChild(el("dt", null, k));
      d.appendChild(el("dd", null, v));
      dl.appendChild(d);
    }
    h.appendChild(dl);
  }

  function findingsList() {
    const box = document.getElementById("findings");
    box.appendChild(el("h2", null, "Findings"));
    if (!DATA.findings.length) {
      box.appendChild(el("div", "card empty", DATA.verdict.text));
      return;
    }
    DATA.findings.forEach((f, i) => {
      const c = el("div", "card finding " + f.severity);
      c.dataset.index = String(i);
      c.tabIndex = 0;
      const t = el("div", "title");
      t.appendChild(el("span", null, (MULTI ? runLabel(f.run) + ": " : "") + f.signature));
      t.appendChild(el("span", "sev", f.severity + " · " + Math.round(100 * f.confidence) + "%"));
      c.appendChild(t);
      c.appendChild(el("div", "summary", f.summary));
      const where = [];
      if (f.steps) where.push(f.steps[0] === f.steps[1] ? UNIT + " " + f.steps[0] : UNIT + "s " + f.steps[0] + "–" + f.steps[1]);
      if (f.layers.length) where.push("layers: " + f.layers.join(", "));
      if (where.length) c.appendChild(el("div", "where", where.join(" · ")));
      if (f.evidence.length) {
        const ul = el("ul", "evidence");
        for (const e of f.evidence) ul.appendChild(el("li", null, e));
        c.appendChild(ul);
      }
      if (f.causes.length) c.appendChild(el("div", "causes", "Likely causes: " + f.causes.join("; ")));
      if (f.note) c.appendChild(el("div", "note", f.note));
      c.appendChild(el("div", "fix", f.fix));
      c.addEventListener("click", () => select(selected === i ? null : i));
      c.addEventListener("keydown", (ev) => { if (ev.key === "Enter") select(selected === i ? null : i); });
      box.appendChild(c);
    });
  }

  function band(steps, xs, above) {
    let [a, b] = steps;
    const span = xs && xs.length ? xs[xs.length - 1] - xs[0] : 0;
    const min = Math.max(1, 0.004 * span);  // keep a one-step finding visible
    if (b - a < min) { const m = (a + b) / 2; a = m - min / 2; b = m + min / 2; }
    return { type: "rect", xref: "x", yref: "paper", x0: a, x1: b, y0: 0, y1: 1,
      fillcolor: BAND, line: { width: above ? 1 : 0, color: "#d92d20" }, layer: above ? "above" : "below" };
  }
  function xsOf(div) {
    const xs = [];
    for (const t of div.data || []) if (t.x && t.x.length) { xs.push(t.x[0], t.x[t.x.length - 1]); }
    xs.sort((p, q) => p - q);
    return xs;
  }

  function select(i) {
    selected = i;
    document.querySelectorAll(".finding").forEach((c) => {
      c.classList.toggle("selected", c.dataset.index === String(i));
    });
    const f = i === null ? null : DATA.findings[i];
    for (const div of curvePlots) {
      Plotly.relayout(div, { shapes: f && f.steps ? [band(f.steps, xsOf(div))] : [] });
    }
    if (f && MULTI && heat && f.run !== heat.run) {
      heat.runSelect.value = String(f.run);
      heat.run = f.run;
    }
    if (f && heat && f.rows && !(f.rows[heat.key] || []).length) {
      // Show the finding's layers: switch to a metric where they have rows (dead-relu ->
      // dead fraction), if the current one has none.
      const key = Object.keys(f.rows).find((k) => f.rows[k].length && RUNS[heat.run].heatmaps[k]);
      if (key) { heat.key = key; heat.metric.value = key; }
    }
    drawHeatmap();
  }

  // -- plots ---------------------------------------------------------------------------------
  function currentSmoothing() {
    const s = document.getElementById("smoothing");
    return s ? Number(s.value) : DATA.smoothing;
  }

  function curves(parent, grid) {
    const card = section(parent, "Loss");
    parent.insertBefore(card, grid);  // the loss first, full width; the rest in the grid
    const ctl = el("div", "controls");
    const lab = el("label", null, "Smoothing ");
    lab.htmlFor = "smoothing";
    const slider = el("input");
    Object.assign(slider, { type: "range", id: "smoothing", min: "0", max: "0.999", step: "0.001" });
    slider.value = String(DATA.smoothing);
    const shown = el("span", null, slider.value);
    const logBox = el("input");
    Object.assign(logBox, { type: "checkbox", id: "loss-log" });
    const logLab = el("label", null, "log scale");
    logLab.htmlFor = "loss-log";
    ctl.append(lab, slider, shown, el("span", "small", "(debiased EMA, as TensorBoard and the analysis)"),
      logBox, logLab);
    card.appendChild(ctl);
    const losses = seriesPlot(card, ["train/loss", "val/loss"], "loss", { smooth: true });
    if (!losses) card.appendChild(el("div", "empty", "no train/loss or val/loss recorded"));
    logBox.addEventListener("change", () => {
      if (losses) Plotly.relayout(losses, { "yaxis.type": logBox.checked ? "log" : "linear" });
    });
    slider.addEventListener("input", () => {
      shown.textContent = slider.value;
      for (const div of curvePlots) {
        if (!div._traces.some((t) => t._ema)) continue;
        applySmoothing(div, Number(slider.value));
        Plotly.react(div, div._traces, div.layout, CONFIG);
      }
    });

    const lrNames = [...new Set(RUNS.flatMap((r) => r.lr))];
    if (lrNames.length) seriesPlot(section(grid, "Learning rate"), lrNames, "learning rate", {});
    if (RUNS.some((r) => r.series.grad_norm)) {
      seriesPlot(section(grid, "Gradient norm (total)"), ["grad_norm"], "grad norm",
        { smooth: true, log: wantsLog(["grad_norm"]) });
    }
    stepTime(grid);
    const extra = [...new Set(RUNS.flatMap((r) => r.extra))];
    for (const name of extra) seriesPlot(section(grid, name), [name], name, {});
  }

  function stepTime(parent) {
    const have = RUNS.map((r, i) => [r.time, i]).filter(([t]) => t);
    if (!have.length) return;
    const card = section(parent, "Step time: data wait and compute");
    const traces = [];
    for (const [t, r] of have) {
      const pre = MULTI ? runLabel(r) + " · " : "";
      if (!MULTI && t.data && t.compute) {
        traces.push({ type: "scatter", mode: "lines", stackgroup: "t", x: t.steps, y: t.data,
          name: "data wait", line: { color: color(1) } });
        traces.push({ type: "scatter", mode: "lines", stackgroup: "t", x: t.steps, y: t.compute,
          name: "compute", line: { color: color(0) } });
      } else {
        // Overlaid runs cannot stack: one line per part.
        for (const [key, dash] of [["data", "dot"], ["compute", "solid"], ["step", "dash"]]) {
          if (t[key] && !(key === "step" && t.data && t.compute)) {
            traces.push({ type: "scatter", mode: "lines", x: t.steps, y: t[key],
              name: ptext(pre + key), line: { color: color(MULTI ? r : 0), dash: dash } });
          }
        }
      }
    }
    const div = plotDiv(card);
    div._traces = traces;
    draw(div, traces, baseLayout("seconds per step"));
    curvePlots.push(div);
    const b = have[0][0].bucket;
    if (b > 1) card.appendChild(el("div", "small", "means over " + b + " steps"));
  }

  function heatmaps(parent) {
    const keys = ["grad_norm", "update_ratio", "dead", "saturated"];
    const runsWith = RUNS.map((r, i) => i).filter((i) => Object.keys(RUNS[i].heatmaps).length);
    if (!runsWith.length) return;
    const card = section(parent, "Layers × steps");
    const ctl = el("div", "controls");
    const metric = el("select");
    metric.id = "heat-metric";
    for (const k of keys) {
      const spec = runsWith.map((i) => RUNS[i].heatmaps[k]).find((h) => h);
      if (!spec) continue;
      const o = el("option", null, spec.label);
      o.value = k;
      metric.appendChild(o);
    }
    ctl.appendChild(metric);
    let runSelect = null;
    if (MULTI) {
      runSelect = el("select");
      for (const i of runsWith) { const o = el("option", null, runLabel(i)); o.value = String(i); runSelect.appendChild(o); }
      ctl.appendChild(runSelect);
    }
    const note = el("span", "small");
    ctl.appendChild(note);
    card.appendChild(ctl);
    const div = plotDiv(card, "tall");
    heat = { div: div, run: runsWith[0], key: metric.value, metric: metric, runSelect: runSelect, note: note };
    metric.addEventListener("change", () => { heat.key = metric.value; drawHeatmap(); });
    if (runSelect) runSelect.addEventListener("change", () => { heat.run = Number(runSelect.value); drawHeatmap(); });
    drawHeatmap();
  }

  function drawHeatmap() {
    if (!heat) return;
    const h = RUNS[heat.run].heatmaps[heat.key];
    if (!h) { Plotly.purge(heat.div); heat.note.textContent = "not recorded for this run"; return; }
    const names = h.layers.map(ptext);
    const hover = h.layers.map((L) => h.bins.map((b) => ptext(L) + "<br>steps " + b[0] + "–" + b[1]));
    const traces = [{
      type: "heatmap", x: h.x, y: h.layers.map((_, i) => i), z: h.z, customdata: hover,
      colorscale: heat.key === "grad_norm" || heat.key === "update_ratio" ? "Viridis" : "Reds",
      hovertemplate: "%{customdata}<br>%{z:.3g}<extra></extra>", colorbar: { title: { text: ptext(h.label) } },
    }];
    if (h.nonfinite.length) {
      traces.push({ type: "scatter", mode: "markers", x: h.nonfinite.map((c) => h.x[c[1]]),
        y: h.nonfinite.map((c) => c[0]), name: "NaN/Inf", showlegend: true,
        marker: { symbol: "x", color: "#d92d20", size: 8 }, hovertemplate: "NaN/Inf<extra></extra>" });
    }
    const layout = baseLayout("", {
      hovermode: "closest",
      yaxis: { tickmode: "array", tickvals: h.layers.map((_, i) => i), ticktext: names,
        autorange: "reversed", automargin: true },
      margin: { l: 120, r: 20, t: 30, b: 40 },
    });
    const f = selected === null ? null : DATA.findings[selected];
    if (f && (!MULTI || f.run === heat.run)) {
      if (f.steps) layout.shapes.push(band(f.steps, h.x, true));
      for (const i of (f.rows && f.rows[heat.key]) || []) {
        layout.shapes.push({ type: "rect", xref: "paper", yref: "y", x0: 0, x1: 1, y0: i - 0.5,
          y1: i + 0.5, line: { color: "#d92d20", width: 2 }, fillcolor: "rgba(0,0,0,0)" });
      }
    }
    const parts = [];
    if (h.steps_per_bin > 1) parts.push("each column: " + fmt(h.steps_per_bin) + " steps (" +
      (heat.key === "dead" || heat.key === "saturated" ? "mean" : "max") + ")");
    if (h.zero_floor !== null && h.zero_floor !== undefined) parts.push("zero drawn as " + h.zero_floor);
    if (h.layers_left_out) parts.push(h.layers_left_out + " more layers not shown");
    heat.note.textContent = parts.join(" · ");
    draw(heat.div, traces, layout);
  }

  function histograms(parent) {
    const opts = [];
    RUNS.forEach((r, i) => r.hist.tensors.forEach((t, j) => opts.push([i, j])));
    if (!opts.length) return;
    const card = section(parent, "Histograms over time");
    const ctl = el("div", "controls");
    const sel = el("select");
    sel.id = "hist-tensor";
    opts.forEach(([i, j], k) => {
      const t = RUNS[i].hist.tensors[j];
      const o = el("option", null, (MULTI ? runLabel(i) + " · " : "") + t.kind + " · " + t.layer);
      o.value = String(k);
      sel.appendChild(o);
    });
    ctl.append(el("span", null, "tensor"), sel, el("span", "small", "fraction of values per signed log2-magnitude bin"));
    card.appendChild(ctl);
    const div = plotDiv(card, "tall");
    function drawHist() {
      const [i, j] = opts[Number(sel.value)];
      const H = RUNS[i].hist;
      const t = H.tensors[j];
      const z = H.labels.map((_, b) => t.frac.map((row) => row[b]));
      draw(div, [{ type: "heatmap", x: t.steps, y: H.labels, z: z, colorscale: "Blues", reversescale: true,
        hovertemplate: "step %{x}<br>bin %{y}<br>%{z:.3f}<extra></extra>" }],
        baseLayout("value bin", { hovermode: "closest", yaxis: { type: "category", title: { text: "value bin" } } }));
    }
    sel.addEventListener("change", drawHist);
    drawHist();
  }

  // -- tables ----------------------------------------------------------------------------
  function table(parent, head, rows, numeric, flagged) {
    const t = el("table");
    const tr = el("tr");
    head.forEach((h, k) => tr.appendChild(el("th", numeric[k] ? "num" : null, h)));
    t.appendChild(tr);
    rows.forEach((row, r) => {
      const x = el("tr", flagged && flagged[r] ? "flagged" : null);
      row.forEach((v, k) => x.appendChild(el("td", numeric[k] ? "num" : null, v)));
      t.appendChild(x);
    });
    parent.appendChild(t);
  }
  function tables(parent) {
    for (const [title, tab] of DATA.tables) {
      if (!tab.rows.length) continue;
      const card = section(parent, title);
      table(card, tab.head, tab.rows, tab.numeric, tab.flagged);
      if (tab.note) card.appendChild(el("div", "small", tab.note));
    }
  }

  // LR range test runs: loss against the swept learning rate, log x axis (html._lr_sweep).
  function lrSweep(parent) {
    const sw = DATA.lr_sweep;
    if (!sw || !sw.lr.length) return;
    const card = section(parent, "LR range test: loss vs learning rate");
    const div = plotDiv(card);
    const layout = baseLayout("train loss", { hovermode: "closest" });
    layout.xaxis = { title: { text: "learning rate" }, type: "log", zeroline: false };
    if (num(sw.suggested)) {
      layout.shapes = [{ type: "line", x0: sw.suggested, x1: sw.suggested, yref: "paper",
        y0: 0, y1: 1, line: { color: color(2), dash: "dash", width: 2 } }];
      layout.annotations = [{ x: Math.log10(sw.suggested), y: 1, yref: "paper",
        text: ptext("suggested " + fmt(sw.suggested) + " (" + (sw.method || "") + ")"),
        showarrow: false, xanchor: "left", yanchor: "top" }];
    }
    draw(div, [
      { type: "scatter", mode: "lines", x: sw.lr, y: sw.loss, name: "raw",
        line: { color: color(0), width: 1 }, opacity: 0.35, hovertemplate: "%{y:.4g} @ lr %{x:.3g}" },
      { type: "scatter", mode: "lines", x: sw.lr, y: sw.smooth, name: "smoothed",
        line: { color: color(0), width: 2 }, hovertemplate: "%{y:.4g} @ lr %{x:.3g}" },
    ], layout);
  }

  header();
  findingsList();
  const plots = document.getElementById("plots");
  curves(plots, document.getElementById("small"));
  lrSweep(plots);
  heatmaps(plots);
  histograms(plots);
  tables(plots);
  // Plots drawn before the grid settled its columns: fit them to their final boxes.
  for (const d of document.querySelectorAll(".js-plotly-plot")) Plotly.Plots.resize(d);
  document.body.dataset.ready = "1";
})();
