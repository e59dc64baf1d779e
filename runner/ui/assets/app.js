// huse-run ui: the charts of a runs table or a compare page, drawn with ECharts from the data
// the server put in #view-data, and the live updates of a runs table.
//
// - parallel coordinates over the columns that vary; brushing an axis hides the table's rows
//   outside the brushed ranges (a page address may carry `#brush=COLUMN:LOW:HIGH`);
// - a scatter of any two columns (a click opens the run);
// - any multi-step metric of the view's runs (or groups: mean line, min-max band), log axis,
//   smoothing;
// - every 3 s the page asks /api/version; when the results changed, it fetches itself and
//   swaps #live (the table and its data) and redraws, without a reload.
(function () {
  'use strict';

  var state = { key: null, log: false, smooth: 0, x: null, y: null, front: '', version: null, brushed: null };
  var charts = {};

  function $(id) { return document.getElementById(id); }
  function readData() {
    var el = $('view-data');
    return el ? JSON.parse(el.textContent) : null;
  }
  function make(tag, attrs, text) {
    var el = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text != null) el.textContent = text;
    return el;
  }
  function chart(id) {
    if (!charts[id]) charts[id] = echarts.init($(id));
    return charts[id];
  }
  function isNum(v) { return typeof v === 'number' && isFinite(v); }
  function column(d, name) { return d.columns.indexOf(name); }
  function numericColumns(d) {
    return d.axes.filter(function (a) {
      var i = column(d, a);
      return d.rows.every(function (r) { return r[i] === null || isNum(r[i]); });
    });
  }

  // ---- the page's layout (built once; #live is swapped under it) ----
  function section(root, title, wide) {
    var sec = make('section', wide ? { class: 'wide' } : {});
    sec.appendChild(make('h3', {}, title));
    root.appendChild(sec);
    return sec;
  }
  function layout(d) {
    var root = $('charts');
    if (!root || root.dataset.built) return;
    root.dataset.built = '1';
    if (d.columns.length > 0) {
      if (d.axes.length >= 2) {
        var pc = section(root, 'parallel coordinates', true);
        pc.appendChild(make('div', { class: 'ctl', id: 'brushnote' }, 'drag along an axis to narrow the table to the runs in that range'));
        pc.appendChild(make('div', { id: 'pc', class: 'chart' }));
      }
      var nums = numericColumns(d);
      if (nums.length >= 2) {
        var sc = section(root, 'scatter', false);
        var ctl = make('div', { class: 'ctl' });
        ctl.appendChild(document.createTextNode('x '));
        ctl.appendChild(make('select', { id: 'sc-x' }));
        ctl.appendChild(document.createTextNode(' y '));
        ctl.appendChild(make('select', { id: 'sc-y' }));
        ctl.appendChild(document.createTextNode(' · Pareto front '));
        var fr = make('select', { id: 'sc-front' });
        [['', 'none'], ['maxmax', 'x max, y max'], ['maxmin', 'x max, y min'], ['minmax', 'x min, y max'], ['minmin', 'x min, y min']]
          .forEach(function (o) { fr.appendChild(make('option', { value: o[0] }, o[1])); });
        ctl.appendChild(fr);
        sc.appendChild(ctl);
        sc.appendChild(make('div', { id: 'sc', class: 'chart' }));
        $('sc-x').onchange = function () { state.x = this.value; scatter(readData()); };
        $('sc-y').onchange = function () { state.y = this.value; scatter(readData()); };
        $('sc-front').onchange = function () { state.front = this.value; scatter(readData()); };
      }
    }
    var cv = section(root, 'curves', d.columns.length === 0);
    var c = make('div', { class: 'ctl' });
    c.appendChild(make('select', { id: 'cv-key' }));
    var log = make('input', { type: 'checkbox', id: 'cv-log' });
    var l1 = make('label', {}, ' log axis ');
    l1.prepend(log);
    c.appendChild(document.createTextNode(' '));
    c.appendChild(l1);
    c.appendChild(document.createTextNode(' · smoothing '));
    c.appendChild(make('input', { type: 'range', id: 'cv-smooth', min: '0', max: '0.99', step: '0.01', value: '0' }));
    c.appendChild(make('span', { id: 'cv-note', class: 'note' }));
    cv.appendChild(c);
    cv.appendChild(make('div', { id: 'cv', class: 'chart' }));
    $('cv-key').onchange = function () { state.key = this.value; curves(readData()); };
    log.onchange = function () { state.log = this.checked; drawCurves(); };
    $('cv-smooth').oninput = function () { state.smooth = Number(this.value); drawCurves(); };
  }

  // ---- parallel coordinates, brushing the table ----
  function parallel(d) {
    if (!$('pc')) return;
    var axes = d.axes.map(function (name, dim) {
      var i = column(d, name);
      var numeric = d.rows.every(function (r) { return r[i] === null || isNum(r[i]); });
      if (numeric) return { dim: dim, name: name, type: 'value', scale: true };
      var cats = Array.from(new Set(d.rows.map(function (r) { return r[i]; }).filter(function (v) { return v !== null; }).map(String))).sort();
      return { dim: dim, name: name, type: 'category', data: cats };
    });
    var rows = d.rows.map(function (r) {
      return d.axes.map(function (name, dim) {
        var v = r[column(d, name)];
        return v === null ? null : (axes[dim].type === 'value' ? v : String(v));
      });
    });
    var c = chart('pc');
    c.setOption({
      animation: false,
      parallel: { left: 40, right: 110, top: 50, bottom: 30,
        parallelAxisDefault: { nameLocation: 'end', nameGap: 14, nameRotate: 12, nameTextStyle: { fontSize: 11 } } },
      parallelAxis: axes,
      series: [{ type: 'parallel', data: rows, lineStyle: { width: 1.2, opacity: 0.6 },
        inactiveOpacity: 0.05, activeOpacity: 1, smooth: false }]
    }, true);
    c.off('axisareaselected');
    c.on('axisareaselected', function () {
      var s = c.getModel().getSeries()[0];
      var normal = s.getRawIndicesByActiveState('normal');
      applyBrush(d, normal.length === rows.length ? null : s.getRawIndicesByActiveState('active'));
    });
    var m = /#brush=([^:]+):([^:]+):([^:&]+)/.exec(decodeURIComponent(location.hash));
    if (m && d.axes.indexOf(m[1]) >= 0) {
      c.dispatchAction({ type: 'axisAreaSelect', parallelAxisIndex: d.axes.indexOf(m[1]), intervals: [[Number(m[2]), Number(m[3])]] });
    }
  }

  function applyBrush(d, indices) {
    state.brushed = indices;
    var keep = indices ? new Set(indices) : null;
    var trs = document.querySelectorAll('#runs tr[data-i]');
    var shown = 0;
    trs.forEach(function (tr) {
      var on = !keep || keep.has(Number(tr.dataset.i));
      tr.hidden = !on;
      if (on) shown++;
    });
    var note = $('brushnote');
    if (!note) return;
    note.textContent = '';
    if (!keep) {
      note.textContent = 'drag along an axis to narrow the table to the runs in that range';
      return;
    }
    note.appendChild(document.createTextNode(indices.length + ' of ' + d.rows.length + ' row(s) in the brushed ranges (' + shown + ' on this page). '));
    var ids = indices.map(function (i) { return d.ids[i]; }).filter(function (v) { return v != null; });
    if (ids.length > 0 && ids.length <= 500) {
      var q = 'id in (' + ids.join(', ') + ')';
      var a = make('a', { href: '/exp/' + encodeURIComponent(d.exp) + '?q=' + encodeURIComponent(q) }, 'filter the table by them');
      note.appendChild(a);
    }
    if (charts.sc) scatter(d);
    if (charts.cv) curves(d);
  }

  // An axis end 5 % beyond the data, so that no point sits on the frame.
  function pad(side) {
    return function (v) {
      var span = (v.max - v.min) || Math.abs(v.max) || 1;
      return Number((side < 0 ? v.min - 0.05 * span : v.max + 0.05 * span).toPrecision(4));
    };
  }

  // ---- scatter of two columns ----
  function scatter(d) {
    if (!$('sc')) return;
    var nums = numericColumns(d);
    var fill = function (sel, pick) {
      sel.textContent = '';
      nums.forEach(function (n) { sel.appendChild(make('option', { value: n }, n)); });
      sel.value = pick;
    };
    if (nums.indexOf(state.x) < 0) state.x = nums[0];
    if (nums.indexOf(state.y) < 0 || state.y === state.x) state.y = nums[nums.length - 1];
    fill($('sc-x'), state.x);
    fill($('sc-y'), state.y);
    var xi = column(d, state.x), yi = column(d, state.y);
    var pts = [];
    d.rows.forEach(function (r, i) {
      if (isNum(r[xi]) && isNum(r[yi])) {
        var out = state.brushed && state.brushed.indexOf(i) < 0;
        pts.push({ value: [r[xi], r[yi]], id: d.ids[i], row: i, itemStyle: { opacity: out ? 0.15 : 0.9 } });
      }
    });
    // The Pareto front of the two columns in the chosen directions: the points no other point
    // matches on both and beats on one (a study's trade-off between two objectives).
    var front = [];
    if (state.front) {
      var sx = state.front.slice(0, 3) === 'max' ? 1 : -1, sy = state.front.slice(3) === 'max' ? 1 : -1;
      var beats = function (a, b) {
        var dx = sx * (a.value[0] - b.value[0]), dy = sy * (a.value[1] - b.value[1]);
        return dx >= 0 && dy >= 0 && (dx > 0 || dy > 0);
      };
      front = pts.filter(function (p) { return !pts.some(function (q) { return q !== p && beats(q, p); }); })
        .map(function (p) { return { value: p.value, id: p.id, row: p.row }; })
        .sort(function (a, b) { return a.value[0] - b.value[0]; });
    }
    var c = chart('sc');
    c.setOption({
      animation: false,
      grid: { left: 70, right: 30, top: 20, bottom: 50 },
      xAxis: { type: 'value', scale: true, min: pad(-1), max: pad(1), axisLabel: { showMinLabel: false, showMaxLabel: false }, name: state.x, nameLocation: 'middle', nameGap: 28 },
      yAxis: { type: 'value', scale: true, min: pad(-1), max: pad(1), axisLabel: { showMinLabel: false, showMaxLabel: false }, name: state.y, nameLocation: 'middle', nameGap: 55 },
      tooltip: { trigger: 'item', formatter: function (p) {
        return (p.data.id != null ? '#' + p.data.id + ': ' : '') + state.x + ' ' + p.data.value[0] + ', ' + state.y + ' ' + p.data.value[1];
      } },
      series: [{ type: 'scatter', data: pts, symbolSize: 8 },
        { name: 'front', type: 'line', data: front, symbol: 'circle', symbolSize: 12, color: '#d62728',
          lineStyle: { type: 'dashed', width: 1 }, z: 3 }]
    }, true);
    c.off('click');
    c.on('click', function (p) { if (p.data && p.data.id != null) location.href = '/run/' + p.data.id; });
  }

  // ---- curves: one metric over the view's runs or groups ----
  var lastCurves = null;
  function curveIds(d) {
    var ids = d.run_ids;
    if (state.brushed && !d.group) {
      ids = state.brushed.map(function (i) { return d.ids[i]; }).filter(function (v) { return v != null; });
    }
    // Runs one by one: the first 20 of the view; groups pool every run of the view.
    return d.group ? ids : ids.slice(0, 20);
  }
  function curves(d) {
    var ids = curveIds(d);
    if (ids.length === 0) { lastCurves = null; drawCurves(); return; }
    var url = '/api/curves?ids=' + ids.join(',') + (d.exp ? '&exp=' + encodeURIComponent(d.exp) : '') +
      (d.group ? '&group=1' + (d.by.length ? '&by=' + encodeURIComponent(d.by.join(',')) : '') : '') +
      (state.key ? '&key=' + encodeURIComponent(state.key) : '');
    fetch(url).then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
      lastCurves = j;
      var sel = $('cv-key');
      sel.textContent = '';
      (j ? j.keys : []).forEach(function (k) { sel.appendChild(make('option', { value: k }, k)); });
      if (j && j.key) { sel.value = j.key; state.key = j.key; }
      var shown = d.group ? ids.length + ' run(s) in ' + (j ? j.series.length : 0) + ' group(s)' : (j ? j.series.length : 0) + ' run(s)';
      $('cv-note').textContent = ' ' + shown + (d.group ? '' : (d.run_ids.length > 20 && !state.brushed ? ' (the first 20 of the view; brush to choose)' : ''));
      drawCurves();
    });
  }
  // TensorBoard's smoothing: an exponential moving average, debiased at the start.
  function smooth(ys, w) {
    if (!w) return ys;
    var out = [], last = 0, n = 0;
    ys.forEach(function (y) {
      last = last * w + (1 - w) * y; n++;
      out.push(last / (1 - Math.pow(w, n)));
    });
    return out;
  }
  var PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
  function drawCurves() {
    if (!$('cv')) return;
    var c = chart('cv');
    var j = lastCurves;
    var series = [], legend = [];
    (j ? j.series : []).forEach(function (s, k) {
      var color = PALETTE[k % PALETTE.length];
      var xs = s.points.map(function (p) { return p[0]; });
      var mean = smooth(s.points.map(function (p) { return p[1]; }), state.smooth);
      var lo = smooth(s.points.map(function (p) { return p[2]; }), state.smooth);
      var hi = smooth(s.points.map(function (p) { return p[3]; }), state.smooth);
      legend.push(s.name);
      series.push({ name: s.name, type: 'line', showSymbol: false, color: color, lineStyle: { width: 1.6 },
        data: xs.map(function (x, i) { return [x, mean[i]]; }) });
      var banded = lo.some(function (v, i) { return hi[i] - v > 1e-12 * Math.abs(v); });
      if (banded) {
        series.push({ name: s.name, type: 'line', stack: 'band' + k, showSymbol: false, lineStyle: { opacity: 0 },
          data: xs.map(function (x, i) { return [x, lo[i]]; }), tooltip: { show: false }, silent: true });
        series.push({ name: s.name, type: 'line', stack: 'band' + k, showSymbol: false, lineStyle: { opacity: 0 },
          areaStyle: { color: color, opacity: 0.18 }, data: xs.map(function (x, i) { return [x, hi[i] - lo[i]]; }),
          tooltip: { show: false }, silent: true });
      }
    });
    c.setOption({
      animation: false,
      grid: { left: 70, right: 170, top: 20, bottom: 50 },
      legend: { type: 'scroll', orient: 'vertical', right: 0, top: 10, data: legend,
        textStyle: { width: 130, overflow: 'truncate', fontSize: 11 }, tooltip: { show: true } },
      tooltip: { trigger: 'axis' },
      xAxis: { type: 'value', name: 'step', nameLocation: 'middle', nameGap: 28, scale: true },
      yAxis: { type: state.log ? 'log' : 'value', scale: true, name: state.key || '', nameLocation: 'middle', nameGap: 55 },
      series: series
    }, true);
  }

  // ---- live updates ----
  function poll() {
    fetch('/api/version', { cache: 'no-store' }).then(function (r) { return r.ok ? r.text() : null; }).then(function (v) {
      if (v == null) return;
      if (state.version === null) { state.version = v; return; }
      if (v === state.version) return;
      state.version = v;
      refresh();
    }).catch(function () {});
  }
  function refresh() {
    var live = $('live');
    if (!live) { var d = readData(); if (d) curves(d); return; }
    fetch(location.href, { cache: 'no-store' }).then(function (r) { return r.ok ? r.text() : null; }).then(function (html) {
      if (html == null) return;
      var doc = new DOMParser().parseFromString(html, 'text/html');
      var next = doc.getElementById('live');
      if (!next) return;
      live.innerHTML = next.innerHTML;
      draw(true);
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    });
  }

  function draw(again) {
    var d = readData();
    if (!d) return;
    layout(d);
    state.brushed = null;
    parallel(d);
    scatter(d);
    curves(d);
    if (!again) {
      window.addEventListener('resize', function () { Object.keys(charts).forEach(function (k) { charts[k].resize(); }); });
      setInterval(poll, 3000);
      poll();
    }
  }

  var started = false;
  function start() { if (!started) { started = true; draw(false); } }
  if (typeof echarts === 'undefined') return;
  document.addEventListener('DOMContentLoaded', start);
  if (document.readyState !== 'loading') start();
})();
