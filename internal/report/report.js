// The report page: reads the JSON in #data and draws it with d3 and
// d3-flame-graph. Everything from the profile is shown with textContent.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var R = D.report;
  var ABSENT = -1;
  var TOP_LINES = 5, TOP_ROWS = 50;

  function human(n) {
    if (n === null || n === undefined || n === ABSENT) return "–";
    var sign = n < 0 ? "-" : "", u = Math.abs(n);
    if (u < 1024) return sign + Math.round(u) + " B";
    var units = ["KiB", "MiB", "GiB", "TiB"], i = -1;
    do { u /= 1024; i++; } while (u >= 1024 && i < units.length - 1);
    return sign + u.toFixed(1) + " " + units[i];
  }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function leaf(frames) { return frames && frames.length ? frames[0] : "(no stack)"; }
  function short(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }

  // Header.
  var meta = document.getElementById("meta");
  meta.textContent = R.samples + " pprof samples, sample rate " + R.sample_rate + " bytes, " +
    (R.duration_s > 0 ? R.duration_s.toFixed(1) + " s recorded" : "snapshot") +
    (R.times_s ? ", " + R.times_s.length + " points in the series" : "");
  if (R.lost && R.lost.length) {
    meta.appendChild(el("div", "LOST events: " + R.lost.join(", "), "lost"));
  }

  // OOM post-mortem.
  if (R.oom) {
    var o = R.oom, box = document.getElementById("oom");
    box.hidden = false;
    box.appendChild(el("strong", "OOM kill of pid " + o.Pid + " (" + o.Comm + ") at " + o.Time));
    var kv = [["kind", o.Kind], ["cgroup", o.CgroupPath || "–"], ["limit", o.Limit ? human(o.Limit) : "none"],
      ["usage", human(o.Usage)], ["anon RSS", human(o.AnonRSS)], ["file RSS", human(o.FileRSS)],
      ["shmem RSS", human(o.ShmemRSS)], ["oom_score_adj", o.OOMScoreAdj]];
    var t = el("table");
    kv.forEach(function (p) { var tr = el("tr"); tr.appendChild(el("th", p[0])); tr.appendChild(el("td", p[1])); t.appendChild(tr); });
    box.appendChild(t);
    (o.Notes || []).forEach(function (n) { box.appendChild(el("div", n, "meta")); });
  }

  var windowSel = null; // [t0, t1] seconds, null = whole recording
  // The page's address may preset the view: #type=alloc_space&window=2-6.
  var hash = {};
  (location.hash || "").replace(/^#/, "").split("&").forEach(function (kv) {
    var i = kv.indexOf("=");
    if (i > 0) hash[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
  });

  // Timeline.
  // Stack lines avoid the red and orange of RSS and RssAnon.
  var stackColors = [2, 0, 4, 5, 6, 8, 9, 7].map(function (i) { return d3.schemeCategory10[i]; });
  var lines = [];
  var times = R.times_s || [];
  if (times.length) {
    lines.push({ name: "total live (all stacks)", values: R.total_inuse_bytes, color: "#000", kind: "total" });
    (R.processes || []).forEach(function (p) {
      lines.push({ name: "RSS pid " + p.pid + " (" + p.comm + ")", values: p.rss_bytes, color: "#d62728", dash: "", kind: "rss" });
      lines.push({ name: "RssAnon pid " + p.pid, values: p.rss_anon_bytes, color: "#ff7f0e", dash: "4,3", kind: "rssanon" });
    });
    (R.cgroups || []).forEach(function (c) {
      lines.push({ name: "cgroup usage " + c.path, values: c.usage_bytes, color: "#9467bd", dash: "2,2", kind: "cgroup" });
    });
    (R.stacks || []).filter(function (s) { return s.series_inuse_bytes; }).slice(0, TOP_LINES).forEach(function (s, i) {
      lines.push({ name: s.growth.trend + ": " + short(leaf(s.frames), 60), values: s.series_inuse_bytes, color: stackColors[i % stackColors.length], kind: "stack" });
    });
    drawTimeline();
  } else {
    document.getElementById("timeline").appendChild(el("p", R.series_missing || "no series", "meta"));
  }


  function drawTimeline() {
    var host = document.getElementById("timeline");
    var W = Math.max(600, Math.min(host.clientWidth || 960, 1400)), H = 300;
    var m = { top: 10, right: 20, bottom: 30, left: 80 };
    var svg = d3.select(host).append("svg").attr("width", W).attr("height", H + 20 * Math.ceil(lines.length / 2));
    var x = d3.scaleLinear().domain(d3.extent(times)).range([m.left, W - m.right]);
    var ymax = d3.max(lines, function (l) { return d3.max(l.values); }) || 1;
    var y = d3.scaleLinear().domain([0, ymax * 1.05]).nice().range([H - m.bottom, m.top]);
    svg.append("g").attr("transform", "translate(0," + (H - m.bottom) + ")")
      .call(d3.axisBottom(x).ticks(8).tickFormat(function (d) { return d + " s"; }));
    svg.append("g").attr("transform", "translate(" + m.left + ",0)")
      .call(d3.axisLeft(y).ticks(6).tickFormat(human));
    var line = d3.line()
      .defined(function (d) { return d[1] !== ABSENT; })
      .x(function (d) { return x(d[0]); }).y(function (d) { return y(d[1]); });
    lines.forEach(function (l) {
      var pts = times.map(function (t, i) { return [t, l.values[i]]; });
      svg.append("path").datum(pts).attr("class", "line line-" + l.kind).attr("stroke", l.color)
        .attr("stroke-dasharray", l.dash || null).attr("d", line).append("title").text(l.name);
    });
    var lg = svg.append("g").attr("class", "legend");
    lines.forEach(function (l, i) {
      var g = lg.append("g").attr("transform", "translate(" + (m.left + (i % 2) * (W / 2 - 40)) + "," + (H + 4 + 20 * Math.floor(i / 2)) + ")");
      g.append("line").attr("x1", 0).attr("x2", 24).attr("y1", 6).attr("y2", 6).attr("stroke", l.color)
        .attr("stroke-width", 2).attr("stroke-dasharray", l.dash || null);
      g.append("text").attr("x", 30).attr("y", 10).text(l.name);
    });
    var brush = d3.brushX().extent([[m.left, m.top], [W - m.right, H - m.bottom]])
      .on("end", function (ev) {
        windowSel = ev.selection ? ev.selection.map(x.invert) : null;
        drawGrowth();
      });
    var bg = svg.append("g").attr("class", "brush").call(brush);
    var m2 = /^([0-9.]+)-([0-9.]+)$/.exec(hash.window || "");
    if (m2 && +m2[2] > +m2[1]) {
      bg.call(brush.move, [x(+m2[1]), x(+m2[2])]);
      windowSel = [+m2[1], +m2[2]];
    }
  }

  // Live bytes of a series at the window's ends: the first and last present
  // points inside it.
  function windowChange(values) {
    if (!windowSel || !values) return null;
    var a = null, b = null;
    for (var i = 0; i < times.length; i++) {
      if (times[i] < windowSel[0] || times[i] > windowSel[1] || values[i] === ABSENT) continue;
      if (a === null) a = i;
      b = i;
    }
    if (a === null || b === a) return null;
    return { delta: values[b] - values[a], perMin: (values[b] - values[a]) / (times[b] - times[a]) * 60 };
  }

  function sparkline(values) {
    var w = 90, h = 18;
    var svg = d3.create("svg").attr("width", w).attr("height", h).attr("class", "spark");
    if (!values || !values.length) return svg.node();
    var x = d3.scaleLinear().domain([0, values.length - 1]).range([1, w - 1]);
    var y = d3.scaleLinear().domain([0, d3.max(values) || 1]).range([h - 1, 1]);
    svg.append("path").attr("fill", "none").attr("stroke", "#555")
      .attr("d", d3.line().defined(function (d) { return d !== ABSENT; }).x(function (d, i) { return x(i); }).y(function (d) { return y(d); })(values));
    return svg.node();
  }

  function drawGrowth() {
    var host = document.getElementById("growth");
    host.textContent = "";
    var counts = Object.keys(R.trends || {}).map(function (k) { return R.trends[k] + " " + k; });
    host.appendChild(el("div", "stacks: " + counts.join(", ") + (R.untracked_stacks ? "; " + R.untracked_stacks + " stacks summed, not tracked one by one" : ""), "meta"));
    var win = document.getElementById("window");
    win.textContent = windowSel
      ? "window " + windowSel[0].toFixed(1) + "–" + windowSel[1].toFixed(1) + " s selected: the column \"in window\" is the change of live bytes inside it (drag again, or click outside it, to clear)"
      : (times.length ? "drag across the timeline to select a window" : "");
    var t = el("table");
    t.id = "growth-table";
    var head = el("tr");
    ["#", "trend", "confidence", "growth", "live", "allocated", "over time", "in window", "stack (leaf first)"].forEach(function (h) { head.appendChild(el("th", h)); });
    t.appendChild(head);
    (R.stacks || []).slice(0, TOP_ROWS).forEach(function (s, i) {
      var tr = el("tr");
      tr.setAttribute("data-trend", s.growth.trend);
      tr.setAttribute("data-leaf", leaf(s.frames));
      tr.appendChild(el("td", i + 1, "num"));
      tr.appendChild(el("td", s.growth.trend, "trend-" + s.growth.trend));
      tr.appendChild(el("td", s.growth.confidence));
      tr.appendChild(el("td", (s.growth.growth_bytes_per_min > 0 ? "+" : "") + human(s.growth.growth_bytes_per_min) + "/min", "num"));
      tr.appendChild(el("td", human(s.inuse_bytes), "num"));
      tr.appendChild(el("td", human(s.alloc_bytes), "num"));
      var sp = el("td"); sp.appendChild(sparkline(s.series_inuse_bytes)); tr.appendChild(sp);
      var wc = windowChange(s.series_inuse_bytes);
      tr.appendChild(el("td", wc ? (wc.delta >= 0 ? "+" : "") + human(wc.delta) + " (" + human(wc.perMin) + "/min)" : "", "num"));
      var st = el("td", null, "frames");
      var det = el("details");
      det.appendChild(el("summary", leaf(s.frames)));
      det.appendChild(el("pre", s.frames.join("\n")));
      (s.growth.reasons || []).forEach(function (r) { det.appendChild(el("div", "– " + r, "meta")); });
      st.appendChild(det);
      tr.appendChild(st);
      t.appendChild(tr);
    });
    host.appendChild(t);
  }
  drawGrowth();

  // Flame graph.
  var sel = document.getElementById("sampletype");
  (D.sampleTypes || []).forEach(function (st) {
    var o = el("option", st); o.value = st;
    if (st === (D.sampleTypes.indexOf(hash.type) >= 0 ? hash.type : D.defaultType)) o.selected = true;
    sel.appendChild(o);
  });
  function drawFlame(type) {
    var host = document.getElementById("flamegraph");
    host.textContent = "";
    var data = D.flame[type];
    if (!data || !data.value) { host.appendChild(el("p", "no " + type + " in this profile", "meta")); return; }
    var isBytes = /_space$/.test(type);
    var chart = flamegraph.default()
      .width(Math.max(600, Math.min(document.body.clientWidth - 10 || 960, 1600)))
      .cellHeight(18).transitionDuration(200).minFrameSize(1).sort(true)
      .setDetailsElement(document.getElementById("flamedetails"))
      .label(function (d) {
        return d.data.name + " — " + (isBytes ? human(d.value) : d.value + " objects") + " (" + (100 * d.value / data.value).toFixed(1) + "%)";
      });
    d3.select(host).datum(data).call(chart);
  }
  sel.addEventListener("change", function () { drawFlame(sel.value); });
  drawFlame(sel.value);

  // Fragmentation and notes.
  var frag = document.getElementById("frag");
  if (R.fragmentation && R.fragmentation.length) {
    R.fragmentation.forEach(function (f) { frag.appendChild(el("div", f, "frames")); });
  } else {
    frag.appendChild(el("p", "no fragmentation figures in this profile", "meta"));
  }
  var notes = document.getElementById("notes");
  (R.notes || []).forEach(function (n) { notes.appendChild(el("div", n)); });
  document.body.setAttribute("data-ready", "1");
})();
