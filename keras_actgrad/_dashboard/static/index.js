// keras-actgrad's TensorBoard dashboard: a probe x step heatmap.
//
// Plain JavaScript, no build step. TensorBoard loads this module in the
// plugin's iframe (base URL /data/plugin/actgrad/) and calls `render()`.
// Data comes from the plugin's routes `runs` and `heatmap` (see plugin.py).

const POLL_MS = 5000;
const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44],
  [253, 231, 37],
];
const COLOURS = {
  missing: '#f0f0f0',
  nan: '#b0b0b0',
  inf: '#ff00c8',
  nonpositive: '#202020',
  alert: '#e8332a',
};
const ALERT_GLYPHS = {'vanishing': '\u25bc', 'exploding': '\u25b2', 'non-finite': '\u2715'};

const STYLE = `
  body { font: 13px/1.4 Roboto, "Helvetica Neue", Arial, sans-serif;
         margin: 0; padding: 12px 16px; color: #212121; background: #fff; }
  .bar { display: flex; flex-wrap: wrap; gap: 14px; align-items: center;
         margin-bottom: 10px; }
  .bar label { color: #616161; }
  .bar select { margin-left: 4px; font: inherit; }
  #status { color: #757575; }
  .legend { display: flex; gap: 14px; align-items: center; color: #616161;
            margin: 6px 0 10px; flex-wrap: wrap; }
  .swatch { display: inline-block; width: 12px; height: 12px;
            vertical-align: -2px; margin-right: 4px; border: 1px solid #ccc; }
  #plot { position: relative; overflow: auto; max-height: calc(100vh - 110px); }
  #tooltip { position: fixed; pointer-events: none; background: rgba(33,33,33,.92);
             color: #fff; padding: 6px 8px; border-radius: 3px; font-size: 12px;
             white-space: pre; display: none; z-index: 10; }
  #empty { color: #757575; padding: 24px 0; }
`;

const state = {
  runs: [], run: null, kind: null, statistic: null, data: null, text: null,
  scale: 'auto', layout: null, timer: null,
};

function el(tag, attributes = {}, text = '') {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function num(value) {
  // The server sends non-finite floats as strings ("NaN", "Infinity").
  if (value === null || value === undefined) return null;
  return typeof value === 'number' ? value : Number(value);
}

function format(value) {
  if (value === null) return 'not logged';
  if (!Number.isFinite(value)) return String(value);
  if (value === 0) return '0';
  const magnitude = Math.abs(value);
  return magnitude >= 1e-3 && magnitude < 1e4 ? value.toPrecision(4) : value.toExponential(3);
}

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + f * (VIRIDIS[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function fillSelect(select, options, current) {
  const values = options.map(String);
  if (select.dataset.values !== values.join('\n')) {
    select.textContent = '';
    for (const value of values) select.appendChild(el('option', {value}, value));
    select.dataset.values = values.join('\n');
  }
  const chosen = values.includes(current) ? current : values[0] ?? null;
  if (chosen !== null) select.value = chosen;
  return chosen;
}

// Colour scale: log over the positive finite values, unless some finite
// value is negative (then linear over all finite values).
function colourScale(values) {
  let low = Infinity, high = -Infinity, lowPos = Infinity, highPos = 0, negative = false;
  for (const row of values) {
    for (const raw of row) {
      const v = num(raw);
      if (v === null || !Number.isFinite(v)) continue;
      low = Math.min(low, v); high = Math.max(high, v);
      if (v < 0) negative = true;
      if (v > 0) { lowPos = Math.min(lowPos, v); highPos = Math.max(highPos, v); }
    }
  }
  const log = state.scale === 'log' || (state.scale === 'auto' && !negative);
  if (log) {
    if (!(highPos > 0)) return {log, colour: () => COLOURS.nonpositive, low: 1, high: 1};
    if (highPos <= lowPos * 1.0001) { lowPos /= 2; highPos *= 2; }
    const a = Math.log10(lowPos), b = Math.log10(highPos);
    return {
      log, low: lowPos, high: highPos,
      colour: (v) => (v > 0 ? viridis((Math.log10(v) - a) / (b - a)) : COLOURS.nonpositive),
    };
  }
  if (!(high > low)) { low -= 1; high += 1; }
  return {log, low, high, colour: (v) => viridis((v - low) / (high - low))};
}

function cellColour(raw, scale) {
  const v = num(raw);
  if (v === null) return COLOURS.missing;
  if (Number.isNaN(v)) return COLOURS.nan;
  if (!Number.isFinite(v)) return COLOURS.inf;
  return scale.colour(v);
}

function draw() {
  const plot = document.getElementById('plot');
  const data = state.data;
  plot.textContent = '';
  if (!data || data.probes.length === 0 || data.steps.length === 0) {
    plot.appendChild(el('div', {id: 'empty'}, 'No keras-actgrad data for this selection yet.'));
    return;
  }
  const probes = data.probes, steps = data.steps;
  const nProbes = probes.length, nSteps = steps.length;
  const available = Math.max(300, plot.clientWidth || window.innerWidth - 40);
  const measure = document.createElement('canvas').getContext('2d');
  measure.font = '11px Roboto, Arial, sans-serif';
  const labelWidth = Math.min(340, 12 + Math.max(...probes.map((p) => measure.measureText(p).width)));
  const barWidth = 90;
  const cellW = Math.max(2, Math.min(48, Math.floor((available - labelWidth - barWidth - 20) / nSteps)));
  const cellH = Math.max(3, Math.min(22, Math.floor(Math.max(360, window.innerHeight - 170) / nProbes)));
  const top = 8, bottom = 42;
  const width = labelWidth + nSteps * cellW + barWidth + 10;
  const height = top + nProbes * cellH + bottom;
  const ratio = window.devicePixelRatio || 1;
  const canvas = el('canvas', {id: 'heatmap'});
  canvas.width = Math.ceil(width * ratio); canvas.height = Math.ceil(height * ratio);
  canvas.style.width = `${width}px`; canvas.style.height = `${height}px`;
  const g = canvas.getContext('2d');
  g.scale(ratio, ratio);
  g.fillStyle = '#fff'; g.fillRect(0, 0, width, height);
  const scale = colourScale(data.values);
  const alerts = new Map();
  const alertRows = new Map();
  for (const [i, j, name] of data.alerts) {
    alerts.set(`${i},${j}`, name);
    if (!alertRows.has(i)) alertRows.set(i, new Set());
    alertRows.get(i).add(name);
  }
  // Cells.
  for (let i = 0; i < nProbes; i++) {
    for (let j = 0; j < nSteps; j++) {
      g.fillStyle = cellColour(data.values[i][j], scale);
      g.fillRect(labelWidth + j * cellW, top + i * cellH, cellW, cellH);
    }
  }
  // Alerts: a red frame; a glyph when the cell is large enough.
  g.lineWidth = Math.min(2, Math.max(1, Math.floor(Math.min(cellW, cellH) / 4)));
  g.strokeStyle = COLOURS.alert;
  g.textAlign = 'center'; g.textBaseline = 'middle';
  g.font = `${Math.max(7, Math.min(12, cellH - 4))}px Arial, sans-serif`;
  for (const [key, name] of alerts) {
    const [i, j] = key.split(',').map(Number);
    const x = labelWidth + j * cellW, y = top + i * cellH;
    const inset = g.lineWidth / 2;
    g.strokeRect(x + inset, y + inset, cellW - 2 * inset, cellH - 2 * inset);
    if (cellW >= 12 && cellH >= 10) {
      g.fillStyle = '#fff';
      g.fillText(ALERT_GLYPHS[name] || '!', x + cellW / 2, y + cellH / 2 + 0.5);
    }
  }
  // Probe labels (thinned when rows are short), alerted probes in red.
  g.textAlign = 'right'; g.textBaseline = 'middle';
  g.font = '11px Roboto, Arial, sans-serif';
  const every = Math.max(1, Math.ceil(12 / cellH));
  for (let i = 0; i < nProbes; i++) {
    if (i % every !== 0 && !alertRows.has(i)) continue;
    if (i % every !== 0 && cellH * every < 12 && alertRows.has(i) && every > 1) {
      // An alerted row between labels: label it only if it does not overlap.
      if ((i % every) * cellH < 11 || (every - i % every) * cellH < 11) continue;
    }
    g.fillStyle = alertRows.has(i) ? COLOURS.alert : '#424242';
    let label = probes[i];
    while (label.length > 4 && g.measureText(label).width > labelWidth - 10) {
      label = '\u2026' + label.slice(2);
    }
    g.fillText(label, labelWidth - 6, top + i * cellH + cellH / 2);
  }
  // Step axis.
  g.textAlign = 'center'; g.textBaseline = 'top'; g.fillStyle = '#424242';
  const stepEvery = Math.max(1, Math.ceil(48 / cellW));
  for (let j = 0; j < nSteps; j += stepEvery) {
    g.fillText(String(steps[j]), labelWidth + j * cellW + cellW / 2, top + nProbes * cellH + 4);
  }
  g.fillText(data.kind === 'epoch' ? 'epoch' : 'step', labelWidth + (nSteps * cellW) / 2,
             top + nProbes * cellH + 22);
  // Colour bar.
  const barX = labelWidth + nSteps * cellW + 14, barH = Math.min(nProbes * cellH, 300);
  for (let k = 0; k < barH; k++) {
    g.fillStyle = viridis(1 - k / Math.max(1, barH - 1));
    g.fillRect(barX, top + k, 14, 1);
  }
  g.textAlign = 'left'; g.textBaseline = 'middle'; g.fillStyle = '#424242';
  g.fillText(format(scale.high), barX + 18, top + 5);
  g.fillText(format(scale.low), barX + 18, top + barH - 5);
  g.fillText(scale.log ? 'log' : 'linear', barX + 18, top + barH / 2);
  plot.appendChild(canvas);
  state.layout = {labelWidth, cellW, cellH, top, nProbes, nSteps};
  document.body.dataset.cells = String(nProbes * nSteps);
  document.body.dataset.alerts = String(data.alerts.length);
  canvas.addEventListener('mousemove', (event) => hover(event, canvas, alerts));
  canvas.addEventListener('mouseleave', () => { tooltip().style.display = 'none'; });
}

function tooltip() { return document.getElementById('tooltip'); }

function hover(event, canvas, alerts) {
  const box = canvas.getBoundingClientRect();
  const {labelWidth, cellW, cellH, top, nProbes, nSteps} = state.layout;
  const j = Math.floor((event.clientX - box.left - labelWidth) / cellW);
  const i = Math.floor((event.clientY - box.top - top) / cellH);
  const tip = tooltip();
  if (i < 0 || j < 0 || i >= nProbes || j >= nSteps) { tip.style.display = 'none'; return; }
  const data = state.data;
  const alert = alerts.get(`${i},${j}`);
  tip.textContent = `${data.probes[i]}\n${data.kind === 'epoch' ? 'epoch' : 'step'} ${data.steps[j]}\n` +
      `${data.statistic} = ${format(num(data.values[i][j]))}` + (alert ? `\nalert: ${alert}` : '');
  tip.style.display = 'block';
  tip.style.left = `${event.clientX + 14}px`;
  tip.style.top = `${event.clientY + 10}px`;
}

function legend(thresholds) {
  const node = document.getElementById('legend');
  node.textContent = '';
  const item = (colour, text, frame = false) => {
    const span = el('span');
    const swatch = el('span', {class: 'swatch'});
    swatch.style.background = frame ? '#fff' : colour;
    if (frame) swatch.style.border = `2px solid ${colour}`;
    span.appendChild(swatch);
    span.appendChild(document.createTextNode(text));
    node.appendChild(span);
  };
  item(COLOURS.alert, `alert: \u25bc vanishing (< ${thresholds.vanishing} \u00d7 last probe's grad_norm), ` +
       `\u25b2 exploding (> ${thresholds.exploding} \u00d7), \u2715 non-finite`, true);
  item(COLOURS.inf, 'inf');
  item(COLOURS.nan, 'NaN (no gradient)');
  item(COLOURS.nonpositive, '\u2264 0 (log scale)');
  item(COLOURS.missing, 'not logged');
}

async function refresh() {
  const status = document.getElementById('status');
  try {
    const {runs} = await getJson('./runs');
    state.runs = runs;
    if (runs.length === 0) {
      state.data = null; draw();
      status.textContent = 'waiting for keras-actgrad events\u2026';
      return;
    }
    state.run = fillSelect(document.getElementById('run'), runs.map((r) => r.run), state.run);
    const kinds = runs.find((r) => r.run === state.run).kinds;
    state.kind = fillSelect(document.getElementById('kind'), Object.keys(kinds), state.kind);
    const preferred = state.statistic ?? 'grad_norm';
    state.statistic = fillSelect(document.getElementById('statistic'), kinds[state.kind], preferred);
    const query = new URLSearchParams({run: state.run, kind: state.kind, statistic: state.statistic});
    const response = await fetch(`./heatmap?${query}`);
    if (!response.ok) throw new Error(`heatmap: HTTP ${response.status}`);
    const text = await response.text();
    if (text !== state.text) {
      state.text = text;
      state.data = JSON.parse(text);
      legend(state.data.thresholds);
      draw();
    }
    const d = state.data;
    status.textContent = `${d.probes.length} probes \u00d7 ${d.steps.length} ${d.kind === 'epoch' ? 'epochs' : 'steps'}, ` +
        `${d.alerts.length} alert cells; updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    status.textContent = `error: ${error.message}`;
  }
}

export async function render() {
  document.head.appendChild(el('style', {}, STYLE));
  const bar = el('div', {class: 'bar'});
  for (const [id, text] of [['run', 'run'], ['kind', 'events'], ['statistic', 'statistic'], ['scale', 'colour scale']]) {
    const label = el('label', {}, text);
    const select = el('select', {id});
    select.addEventListener('change', () => {
      state[id] = select.value;
      if (id === 'scale') { draw(); return; }
      state.text = null;
      refresh();
    });
    label.appendChild(select);
    bar.appendChild(label);
  }
  bar.appendChild(el('span', {id: 'status'}, 'loading\u2026'));
  document.body.appendChild(bar);
  document.body.appendChild(el('div', {id: 'legend', class: 'legend'}));
  document.body.appendChild(el('div', {id: 'plot'}));
  document.body.appendChild(el('div', {id: 'tooltip'}));
  fillSelect(document.getElementById('scale'), ['auto', 'log', 'linear'], 'auto');
  window.addEventListener('resize', draw);
  await refresh();
  state.timer = setInterval(refresh, POLL_MS);
}
