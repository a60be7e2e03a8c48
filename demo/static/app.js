// Demo page of the emotion recognition service: photos, clips and the webcam through the
// demo server's relay to TorchServe (demo/server.py). Plain JavaScript, no dependencies.
'use strict';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
const VIDEO_BOX_INTERVAL_MS = 400; // how often the playing video's face box is refreshed

const state = { config: null, last: null, video: null, webcam: null, lastWebcam: null, requests: 0, photo: null,
  explained: null };
window.demo = state; // for the browser test and the curious
window.demoLiveCsv = () => liveCsv();

// --- talking to the service ---------------------------------------------------------------

class ServiceError extends Error {}

function describeError(status, body, text) {
  const type = body && body.type ? body.type : '';
  const msg = body && body.message ? body.message : (text || '').slice(0, 300) || `HTTP ${status}`;
  if (type === 'InvalidKeyException' || /Token Authorization/i.test(msg)) {
    return `TorchServe refused the inference key (${status} ${type}): ${msg}\n` +
      `The demo server reads it from ${state.config ? state.config.key_file : 'key_file.json'} at every ` +
      'request; TorchServe writes new keys each time it starts: is that the running server\'s key file?';
  }
  if (type === 'TorchServeUnreachable' || type === 'NoInferenceKey') return msg;
  return `The service answered ${status}${type ? ' ' + type : ''}: ${msg}`;
}

async function predict(task, blob, filename, api = 'predictions') {
  // api: 'predictions', or 'explanations' (the same answer with a map per face)
  const model = state.config.models[task];
  const form = new FormData();
  form.append(task === 'video' ? 'video' : 'data', blob, filename || 'upload');
  let response;
  try {
    response = await fetch(`/${api}/${encodeURIComponent(model)}`, { method: 'POST', body: form });
  } catch (e) {
    throw new ServiceError(`No answer from the demo server at ${location.origin} (is \`make demo\` still ` +
      `running?): ${e.message}`);
  }
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch (e) { body = null; }
  if (!response.ok) throw new ServiceError(describeError(response.status, body, text));
  if (body === null || typeof body !== 'object') throw new ServiceError(`The service's answer is not JSON: ${text.slice(0, 200)}`);
  state.requests += 1;
  return body;
}

function showMessage(text) {
  const box = $('message');
  box.textContent = text;
  box.hidden = !text;
}

function showAnswer(answer) {
  state.last = answer;
  $('raw-json').textContent = JSON.stringify(answer, null, 2);
}

// --- drawing ------------------------------------------------------------------------------

function colorOf(label) {
  return (state.config && state.config.colors[label]) || '#ffffff';
}

function topOf(entry) {
  // the top-k list: "top3" today; any "top<k>" the service is configured with
  const key = Object.keys(entry || {}).find((k) => /^top\d+$/.test(k) && Array.isArray(entry[k]));
  return key ? entry[key] : [];
}

function pct(p) { return `${(100 * p).toFixed(1)}%`; }

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Boxes as positioned elements over an image or video of natural size (w, h).
function drawBoxes(overlay, faces, w, h, labelFor) {
  overlay.replaceChildren();
  faces.forEach((face, i) => {
    const [x1, y1, x2, y2] = face.box;
    const { label, text } = labelFor(face, i);
    const box = el('div', 'box');
    box.dataset.index = String(i);
    box.dataset.label = label || '';
    box.style.left = `${(100 * x1) / w}%`;
    box.style.top = `${(100 * y1) / h}%`;
    box.style.width = `${(100 * (x2 - x1)) / w}%`;
    box.style.height = `${(100 * (y2 - y1)) / h}%`;
    box.style.setProperty('--c', colorOf(label));
    box.append(el('span', 'box-label', text));
    overlay.append(box);
  });
  placeLabels(overlay);
}

const overlaps = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;

// Each box's label tab kept off the tabs placed before it and, where it can be, off the other
// faces: above the box (inside its top edge when there is no room), else below it, inside its top
// edge, or further up; demo/draw.py's place_tab draws the annotated files by the same rule.
function placeLabels(overlay) {
  const area = overlay.getBoundingClientRect();
  const boxes = [...overlay.querySelectorAll('.box')];
  const rects = boxes.map((b) => b.getBoundingClientRect());
  const taken = [];
  boxes.forEach((box, i) => {
    const tab = box.querySelector('.box-label');
    const b = rects[i];
    const w = tab.offsetWidth;
    const h = tab.offsetHeight;
    const first = b.top - h >= area.top ? -h : 0;
    const spotAt = (dy) => ({ dy, left: b.left - 3, right: b.left - 3 + w, top: b.top + dy, bottom: b.top + dy + h });
    const spots = [first, b.height, 0, -2 * h, -3 * h, -4 * h].map(spotAt)
      .filter((r) => r.top >= area.top && r.bottom <= area.bottom);
    const others = rects.filter((_, j) => j !== i);
    const free = (avoid) => spots.find((r) => !avoid.some((a) => overlaps(r, a)));
    const spot = free(taken.concat(others)) || free(taken) || spotAt(first);
    tab.style.bottom = 'auto';
    tab.style.top = `${spot.dy}px`;
    taken.push(spot);
  });
}

window.addEventListener('resize', () => document.querySelectorAll('.overlay').forEach(placeLabels));

function faceLabel(face, i) {
  const top = topOf(face)[0];
  if (!top) return { label: '', text: `${i + 1}` };
  return { label: top.label, text: `${i + 1} ${top.label} ${pct(top.probability)}` };
}

function bars(top) {
  const list = el('div', 'bars');
  for (const { label, probability } of top) {
    const bar = el('div', 'bar');
    bar.title = `${label}: ${pct(probability)}`;
    bar.dataset.label = label;
    bar.dataset.probability = String(probability);
    const track = el('span', 'bar-track');
    const fill = el('span', 'bar-fill');
    fill.style.display = 'block';
    fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
    fill.style.setProperty('--c', colorOf(label));
    track.append(fill);
    bar.append(el('span', 'bar-name', label), track, el('span', 'bar-tip', pct(probability)));
    list.append(bar);
  }
  return list;
}

function faceCards(list, overlay, faces) {
  list.replaceChildren();
  faces.forEach((face, i) => {
    const item = el('li', 'face');
    const what = face.detected === false ? 'the whole image' : `Face ${i + 1}`;
    item.append(el('h3', '', `${what}${face.score !== undefined ? ` · detector score ${face.score.toFixed(3)}` : ''}`));
    item.append(bars(topOf(face)));
    item.addEventListener('mouseenter', () => overlay.children[i] && overlay.children[i].classList.add('hl'));
    item.addEventListener('mouseleave', () => overlay.children[i] && overlay.children[i].classList.remove('hl'));
    list.append(item);
  });
}

function loaded(media, event) {
  return new Promise((resolve) => {
    const done = (ok) => { media.removeEventListener(event, yes); media.removeEventListener('error', no); resolve(ok); };
    const yes = () => done(true);
    const no = () => done(false);
    media.addEventListener(event, yes);
    media.addEventListener('error', no);
  });
}

// --- why: each face's map from the explanations API -----------------------------------------

function heat(v) {
  // a map value in [0, 1] -> RGBA: transparent where the model did not look (below the floor),
  // opaque red where it looked most
  // (demo/palette.py heat: the floor and opacity come from /config.json)
  const { floor, alpha } = state.config.why;
  v = Math.max(0, Math.min(1, v));
  const a = Math.round(alpha * Math.max(0, Math.min(1, (v - floor) / (1 - floor))));
  return [255, Math.round(225 * (1 - v)), Math.round(40 * (1 - v)), a];
}

function mapCanvas(e) {
  // a face's grid x grid map as a grid x grid canvas of heat colours
  const g = e.grid;
  const cells = document.createElement('canvas');
  cells.width = g;
  cells.height = g;
  const cctx = cells.getContext('2d');
  const pixels = cctx.createImageData(g, g);
  e.map.forEach((row, y) => row.forEach((v, x) => pixels.data.set(heat(v), 4 * (y * g + x))));
  cctx.putImageData(pixels, 0, 0);
  return cells;
}

function whyThumbnail(img, e, side) {
  // the face crop the model saw, cut from the photo through its corners, with the map over it
  const canvas = el('canvas', 'why-thumb');
  canvas.width = side;
  canvas.height = side;
  const ctx = canvas.getContext('2d');
  const [c0, c1, , c3] = e.corners;
  const a = (c1[0] - c0[0]) / side, b = (c1[1] - c0[1]) / side, c = (c3[0] - c0[0]) / side, d = (c3[1] - c0[1]) / side;
  const det = a * d - b * c; // photo -> thumbnail: the inverse of thumbnail -> photo
  ctx.setTransform(d / det, -b / det, -c / det, a / det, (c * c0[1] - d * c0[0]) / det, (b * c0[0] - a * c0[1]) / det);
  ctx.filter = 'grayscale(1)';
  ctx.drawImage(img, 0, 0);
  ctx.filter = 'none';
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(mapCanvas(e), 0, 0, side, side);
  return canvas;
}

function drawWhy(canvas, faces, w, h) {
  // Each face's grid x grid map drawn over its model crop: the crop's corners in the photo give
  // the affine transform (the crop may be rotated and scaled: faces are aligned by their landmarks).
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, w, h);
  for (const face of faces) {
    const e = face.explanation;
    if (!e || !Array.isArray(e.map) || !Array.isArray(e.corners)) continue;
    const g = e.grid;
    const cells = mapCanvas(e);
    const [c0, c1, , c3] = e.corners;
    ctx.setTransform((c1[0] - c0[0]) / g, (c1[1] - c0[1]) / g, (c3[0] - c0[0]) / g, (c3[1] - c0[1]) / g, c0[0], c0[1]);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(cells, 0, 0);
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
}

async function showWhy() {
  const toggle = $('photo-why-toggle');
  const canvas = $('photo-why');
  const stage = $('photo-stage');
  const img = $('photo-img');
  if (!toggle.checked || !state.photo) {
    canvas.hidden = true;
    document.querySelectorAll('#photo-faces .why-thumb').forEach((t) => t.remove());
    return;
  }
  stage.dataset.why = 'busy';
  try {
    if (!state.explained || state.explained.file !== state.photo) {
      $('photo-note').textContent = 'Asking the explanations API what the model looked at…';
      const file = state.photo;
      const answer = await predict('image', file, file.name, 'explanations');
      if (file !== state.photo) return; // another photo came meanwhile
      state.explained = { file, answer };
      showAnswer(answer);
    }
    const faces = Array.isArray(state.explained.answer.faces) ? state.explained.answer.faces : [];
    drawWhy(canvas, faces, img.naturalWidth, img.naturalHeight);
    canvas.hidden = !toggle.checked;
    document.querySelectorAll('#photo-faces .face').forEach((card, i) => {
      card.querySelectorAll('.why-thumb').forEach((t) => t.remove());
      const e = faces[i] && faces[i].explanation;
      if (e) card.prepend(whyThumbnail(img, e, 96)); // floats right of the title and bars
    });
    $('photo-note').textContent = faces.length === 0 ? 'No face found.'
      : 'Red: where hiding the picture lowers the face\'s top label the most (occlusion, per face crop).';
  } catch (e) {
    canvas.hidden = true;
    showMessage(e.message);
  } finally {
    stage.dataset.why = 'done';
  }
}

// --- photo --------------------------------------------------------------------------------

async function onPhoto(file) {
  showMessage('');
  const img = $('photo-img');
  const stage = $('photo-stage');
  const note = $('photo-note');
  state.photo = file;
  state.explained = null;
  $('photo-why').hidden = true;
  $('photo-boxes').replaceChildren();
  $('photo-faces').replaceChildren();
  stage.dataset.state = 'busy';
  note.textContent = `Sending ${file.name} to the image model…`;
  const shown = loaded(img, 'load');
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  stage.hidden = false;
  try {
    const [answer, ok] = await Promise.all([predict('image', file, file.name), shown]);
    showAnswer(answer);
    const faces = Array.isArray(answer.faces) ? answer.faces : [];
    if (ok) drawBoxes($('photo-boxes'), faces, img.naturalWidth, img.naturalHeight, faceLabel);
    else stage.hidden = true;
    faceCards($('photo-faces'), $('photo-boxes'), faces);
    const det = answer.detection || {};
    note.textContent = faces.length === 0 ? 'No face found.'
      : det.whole_image ? 'Classified as a whole: it is a tight face crop already, or no face was found in it.'
        : `${faces.length} face${faces.length > 1 ? 's' : ''} found, largest first. Hover a bar for its probability.`;
  } catch (e) {
    stage.hidden = true;
    note.textContent = '';
    showMessage(e.message);
  } finally {
    stage.dataset.state = 'done';
  }
  if ($('photo-why-toggle').checked && stage.hidden === false) await showWhy();
}

// --- video --------------------------------------------------------------------------------

function windowsOf(answer) {
  const timeline = Array.isArray(answer.timeline) ? answer.timeline : [];
  return timeline.filter((w) => typeof w.start === 'number' && typeof w.end === 'number');
}

function windowAt(answer, t) {
  // the window whose middle is nearest to t among those that hold t; the whole clip without a timeline
  let best = null;
  for (const w of windowsOf(answer)) {
    if (t < w.start - 1e-6 || t > w.end + 1e-6) continue;
    if (!best || Math.abs((w.start + w.end) / 2 - t) < Math.abs((best.start + best.end) / 2 - t)) best = w;
  }
  return best || { start: 0, end: answer.duration || 0, whole: true, ...answer };
}

function drawTimeline(answer) {
  const svg = $('timeline');
  svg.replaceChildren();
  const labels = state.config.labels;
  const W = 760, H = 240, left = 42, right = 12, top = 12, bottom = 30;
  const duration = Math.max(answer.duration || 0, 1e-3);
  const wins = windowsOf(answer);
  const points = wins.length ? wins : [{ start: 0, end: duration, ...answer, whole: true }];
  let ymax = 0;
  for (const w of points) for (const t of topOf(w)) ymax = Math.max(ymax, t.probability);
  ymax = Math.min(1, Math.max(0.2, Math.ceil(ymax * 5) / 5)); // ticks at multiples of 0.05
  const x = (t) => left + ((W - left - right) * t) / duration;
  const y = (p) => top + (H - top - bottom) * (1 - p / ymax);
  const add = (parent, tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    parent.append(node);
    return node;
  };
  for (let i = 0; i <= 4; i += 1) {
    const p = (ymax * i) / 4;
    add(svg, 'line', { class: 'grid', x1: left, x2: W - right, y1: y(p), y2: y(p) });
    add(svg, 'text', { x: left - 6, y: y(p) + 4, 'text-anchor': 'end' }, p.toFixed(2));
  }
  const step = duration > 20 ? 5 : duration > 8 ? 2 : duration > 3 ? 1 : 0.5;
  for (let t = 0; t <= duration + 1e-6; t += step) {
    add(svg, 'text', { x: x(t), y: H - bottom + 16, 'text-anchor': 'middle' }, `${+t.toFixed(1)} s`);
  }
  add(svg, 'line', { class: 'axis', x1: left, x2: W - right, y1: y(0), y2: y(0) });
  add(svg, 'line', { class: 'axis', x1: left, x2: left, y1: top, y2: y(0) });
  // one line per label through the windows where the service reports it (its top-k)
  const prob = (w, label) => { const t = topOf(w).find((e) => e.label === label); return t ? t.probability : null; };
  const mid = (w) => (w.start + w.end) / 2;
  for (const label of labels) {
    let d = '';
    let pen = false;
    for (const w of points) {
      const p = prob(w, label);
      if (p === null) { pen = false; continue; }
      d += `${pen ? 'L' : 'M'}${x(mid(w)).toFixed(1)},${y(p).toFixed(1)} `;
      pen = true;
    }
    if (d) add(svg, 'path', { class: 'series', d, stroke: colorOf(label), 'data-label': label });
  }
  // one group per window: a hover band over its span and a point per reported label
  points.forEach((w, i) => {
    const g = add(svg, 'g', { class: w.whole ? 'overall' : 'window', 'data-index': i, 'data-start': w.start,
      'data-end': w.end, 'data-top': (topOf(w)[0] || {}).label || '' });
    add(g, 'title', {}, `${w.start.toFixed(2)}–${w.end.toFixed(2)} s: ` +
      topOf(w).map((t) => `${t.label} ${pct(t.probability)}`).join(', '));
    add(g, 'rect', { x: x(w.start), y: top, width: Math.max(1, x(w.end) - x(w.start)), height: y(0) - top });
    for (const t of topOf(w)) {
      add(g, 'circle', { cx: x(mid(w)), cy: y(t.probability), r: 3.5, fill: colorOf(t.label), 'data-label': t.label });
    }
  });
  state.cursor = add(svg, 'line', { class: 'cursor', x1: x(0), x2: x(0), y1: top, y2: y(0) });
  state.timelineX = x;
  svg.onclick = (ev) => {
    const video = $('video');
    const box = svg.getBoundingClientRect();
    const sx = ((ev.clientX - box.left) / box.width) * W;
    const t = ((sx - left) / (W - left - right)) * duration;
    if (Number.isFinite(video.duration)) video.currentTime = Math.max(0, Math.min(video.duration, t));
  };
  const legend = $('legend');
  legend.replaceChildren();
  for (const label of labels) {
    const item = el('li');
    const sw = el('span', 'swatch');
    sw.style.background = colorOf(label);
    item.append(sw, document.createTextNode(label));
    legend.append(item);
  }
  $('timeline-figure').hidden = false;
}

function videoTick() {
  const v = state.video;
  const video = $('video');
  if (!v || !v.answer) return;
  const t = video.currentTime || 0;
  if (state.cursor) {
    const cx = state.timelineX(Math.min(t, v.answer.duration || t));
    state.cursor.setAttribute('x1', cx);
    state.cursor.setAttribute('x2', cx);
  }
  const w = windowAt(v.answer, t);
  const top = topOf(w)[0];
  const span = w.whole ? 'whole clip' : `window ${w.start.toFixed(1)}–${w.end.toFixed(1)} s`;
  $('video-now').textContent = top ? `At ${t.toFixed(1)} s (${span}): ${top.label} ${pct(top.probability)}` : '';
  // the video model uses the largest face of each frame: draw it with the current label
  const faces = (v.faces || []).slice(0, 1);
  const w0 = video.videoWidth, h0 = video.videoHeight;
  if (w0 && h0) {
    drawBoxes($('video-boxes'), faces, w0, h0, () => ({ label: top ? top.label : '',
      text: top ? `${top.label} ${pct(top.probability)}` : '' }));
  }
}

async function grabFrame(video) {
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext('2d').drawImage(video, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', 0.9));
}

async function refreshVideoBox() {
  const v = state.video;
  const video = $('video');
  if (!v || !video.videoWidth || v.failed) return;
  if (v.busy) { v.again = true; return; } // one request at a time; the latest frame next
  v.busy = true;
  try {
    const at = video.currentTime;
    const blob = await grabFrame(video);
    const answer = await predict('image', blob, 'frame.jpg');
    if (state.video === v) {
      v.faces = (answer.faces || []).filter((f) => f.detected !== false);
      v.boxTime = at; // the moment of the video the box was found at
    }
    videoTick();
  } catch (e) {
    v.failed = true; // one message, not one per frame
    $('video-note').textContent = `Face boxes unavailable: ${e.message}`;
  } finally {
    v.busy = false;
    if (v.again) { v.again = false; refreshVideoBox(); }
  }
}

async function onVideo(file) {
  showMessage('');
  if (state.video && state.video.timer) clearInterval(state.video.timer);
  const v = { file, answer: null, faces: [], busy: false };
  state.video = v;
  const video = $('video');
  const stage = $('video-stage');
  stage.dataset.state = 'busy';
  $('video-boxes').replaceChildren();
  $('video-summary').replaceChildren();
  $('video-summary-title').hidden = true;
  $('video-now').textContent = '';
  $('timeline-figure').hidden = true;
  const note = $('video-note');
  note.textContent = `Sending ${file.name} to the video model (about a second per few seconds of video)…`;
  if (video.src) URL.revokeObjectURL(video.src);
  const playable = loaded(video, 'loadeddata');
  video.src = URL.createObjectURL(file);
  stage.hidden = false;
  try {
    const answer = await predict('video', file, file.name);
    if (state.video !== v) return;
    v.answer = answer;
    showAnswer(answer);
    $('video-summary-title').hidden = false;
    $('video-summary').replaceChildren(bars(topOf(answer)));
    const people = Array.isArray(answer.people) ? answer.people : []; // per-person answers, when the service sends them
    if (people.length > 1) {
      const list = el('ol', 'faces');
      people.forEach((p, i) => {
        const item = el('li', 'face');
        const span = typeof p.start === 'number' && typeof p.end === 'number' ? ` · ${p.start.toFixed(1)}–${p.end.toFixed(1)} s` : '';
        item.append(el('h3', '', `Person ${i + 1}${i === 0 ? ' (main)' : ''}${span}`), bars(topOf(p)));
        list.append(item);
      });
      $('video-summary').append(list);
    }
    drawTimeline(answer);
    const n = windowsOf(answer).length;
    const faces = answer.faces || {};
    note.textContent = `${(answer.duration || 0).toFixed(2)} s, ${answer.frames} frames; ` +
      (n ? `${n} timeline windows. ` : 'shorter than one window: one answer for the whole clip. ') +
      (faces.whole_frame ? 'No face found: whole frames were classified.'
        : `A face in ${faces.found_frames} of ${faces.sampled_frames} sampled frames.`);
    if (await playable) {
      await refreshVideoBox();
      v.timer = setInterval(() => { if (!video.paused) refreshVideoBox(); }, VIDEO_BOX_INTERVAL_MS);
    } else {
      stage.hidden = true;
      note.textContent += ' This browser cannot play this file; the timeline is the service\'s.';
    }
  } catch (e) {
    note.textContent = '';
    showMessage(e.message);
  } finally {
    stage.dataset.state = 'done';
  }
}

// --- webcam: the live model, one sequence per tab ------------------------------------------

const LIVE_INTERVAL_MS = 100; // 10 frames a second; one in flight, the others dropped
const LIVE_MAX_SIDE = 640; // frames are sent at most this large
const CHART_SECONDS = 30; // each person's chart shows the last 30 s

function newSequenceId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return 'tab-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function grabLiveFrame(video) {
  const scale = Math.min(1, LIVE_MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
  const canvas = document.createElement('canvas');
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext('2d').drawImage(video, 0, 0, canvas.width, canvas.height);
  return { scale, blob: await new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', 0.85)) };
}

async function sendLive(cam, blob, t, end = false) {
  // one frame of this tab's sequence through the demo server's /live relay
  const form = new FormData();
  if (blob) form.append('data', blob, 'frame.jpg');
  form.append('time', t.toFixed(3));
  const headers = { 'X-Live-Sequence': cam.seq };
  if (end) headers['X-Live-End'] = '1';
  let response;
  try {
    response = await fetch('/live', { method: 'POST', body: form, headers });
  } catch (e) {
    throw new ServiceError(`No answer from the demo server at ${location.origin}: ${e.message}`);
  }
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch (e) { body = null; }
  if (!response.ok) throw new ServiceError(describeError(response.status, body, text));
  state.requests += 1;
  return body;
}

function livePeople(cam, answer) {
  // each visible person's smoothed probabilities into their 30-second history and the CSV rows
  for (const p of answer.people || []) {
    const person = cam.people.get(p.id) || { id: p.id, history: [] };
    cam.people.set(p.id, person);
    person.last = p;
    person.history.push({ t: answer.time, probs: p.probabilities });
    while (person.history.length && person.history[0].t < answer.time - CHART_SECONDS) person.history.shift();
    const top = topOf(p)[0];
    cam.csv.push([answer.time.toFixed(3), p.id, top ? top.label : '',
      ...state.config.labels.map((l) => (p.probabilities[l] || 0).toFixed(4))].join(','));
  }
}

function personChart(person) {
  // the person's smoothed probabilities over the last 30 s, one line per emotion
  const w = 300, h = 90;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.setAttribute('class', 'live-chart');
  svg.dataset.person = String(person.id);
  const now = person.history.length ? person.history[person.history.length - 1].t : 0;
  const x = (t) => w - ((now - t) / CHART_SECONDS) * w;
  const y = (p) => h - 2 - p * (h - 4);
  for (const [tx, text, anchor] of [[2, `${CHART_SECONDS} s ago`, 'start'], [w - 2, 'now', 'end']]) {
    const label = document.createElementNS(SVG, 'text');
    label.setAttribute('x', tx);
    label.setAttribute('y', 10);
    label.setAttribute('text-anchor', anchor);
    label.textContent = text;
    svg.append(label);
  }
  for (const label of state.config.labels) {
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', person.history.map((e) => `${x(e.t).toFixed(1)},${y(e.probs[label] || 0).toFixed(1)}`).join(' '));
    line.setAttribute('class', 'series');
    line.dataset.label = label;
    line.style.stroke = colorOf(label);
    svg.append(line);
  }
  return svg;
}

function drawLive(cam, answer, video) {
  const people = answer.people || [];
  const w = video.videoWidth * cam.scale, h = video.videoHeight * cam.scale;
  drawBoxes($('webcam-boxes'), people, w, h, (p) => {
    const top = topOf(p)[0];
    return { label: top ? top.label : '', text: `${p.id} ${top ? `${top.label} ${pct(top.probability)}` : ''}` };
  });
  [...$('webcam-boxes').children].forEach((box, i) => { box.dataset.person = String(people[i].id); });
  const list = $('webcam-faces');
  list.replaceChildren();
  for (const p of people) {
    const person = cam.people.get(p.id);
    const item = el('li', 'face');
    item.dataset.person = String(p.id);
    const frameTop = topOf({ top3: p.frame_top3 })[0];
    item.append(el('h3', '', `Person ${p.id} · ${p.frames} frames · this frame: ${frameTop ? frameTop.label : ''}`));
    item.append(bars(topOf(p)), personChart(person));
    list.append(item);
  }
}

async function webcamStep() {
  const cam = state.webcam;
  const video = $('webcam');
  if (!cam || !video.videoWidth) return;
  if (cam.busy) { cam.dropped += 1; return; } // one frame in flight: this one is dropped, not queued
  cam.busy = true;
  try {
    const t = (performance.now() - cam.started) / 1000;
    const { scale, blob } = await grabLiveFrame(video);
    const answer = await sendLive(cam, blob, t);
    if (state.webcam !== cam) return;
    cam.scale = scale;
    showMessage('');
    showAnswer(answer);
    livePeople(cam, answer);
    drawLive(cam, answer, video);
    cam.frames += 1;
    $('webcam-stage').dataset.frames = String(cam.frames);
    $('webcam-note').textContent = `Live: sequence ${cam.seq}, ${cam.frames} frames answered, ${cam.dropped} dropped ` +
      'while one was in flight; labels are smoothed over the last seconds.';
  } catch (e) {
    showMessage(e.message);
  } finally {
    cam.busy = false;
  }
}

function liveCsv() {
  const cam = state.webcam || state.lastWebcam;
  if (!cam) return '';
  return ['time,person,label,' + state.config.labels.join(','), ...cam.csv].join('\n') + '\n';
}

function downloadCsv() {
  const url = URL.createObjectURL(new Blob([liveCsv()], { type: 'text/csv' }));
  const a = el('a');
  a.href = url;
  a.download = 'emotions_live.csv';
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function startWebcam() {
  showMessage('');
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showMessage('This browser does not offer a webcam to this page (it needs http://127.0.0.1 or https).');
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (e) {
    showMessage(`No webcam: ${e.name}: ${e.message}`);
    return;
  }
  const video = $('webcam');
  video.srcObject = stream;
  await video.play().catch(() => {});
  $('webcam-stage').hidden = false;
  $('webcam-start').disabled = true;
  $('webcam-stop').disabled = false;
  $('webcam-csv').disabled = false;
  state.webcam = { stream, seq: newSequenceId(), busy: false, frames: 0, dropped: 0, scale: 1,
    started: performance.now(), people: new Map(), csv: [], timer: setInterval(webcamStep, LIVE_INTERVAL_MS) };
  $('webcam-note').textContent = 'Live: waiting for the first answer…';
}

function stopWebcam() {
  const cam = state.webcam;
  if (!cam) return;
  clearInterval(cam.timer);
  cam.stream.getTracks().forEach((t) => t.stop());
  state.webcam = null;
  state.lastWebcam = cam; // its CSV stays downloadable
  sendLive(cam, null, (performance.now() - cam.started) / 1000, true).catch(() => {}); // close the sequence
  $('webcam').srcObject = null;
  $('webcam-start').disabled = false;
  $('webcam-stop').disabled = true;
  $('webcam-note').textContent = `Stopped after ${cam.frames} frames.`;
}

// --- wiring -------------------------------------------------------------------------------

function fileInput(dropId, inputId, handler) {
  const drop = $(dropId);
  const input = $(inputId);
  input.addEventListener('change', () => { if (input.files[0]) handler(input.files[0]); input.value = ''; });
  drop.addEventListener('dragover', (ev) => { ev.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (ev) => {
    ev.preventDefault();
    drop.classList.remove('over');
    const file = ev.dataTransfer.files[0];
    if (file) handler(file);
  });
}

function tabs() {
  const buttons = document.querySelectorAll('.tabs button');
  buttons.forEach((button) => button.addEventListener('click', () => {
    buttons.forEach((b) => {
      b.setAttribute('aria-selected', String(b === button));
      $(b.dataset.panel).hidden = b !== button;
    });
    if (button.dataset.panel !== 'webcam-panel') stopWebcam();
  }));
}

async function init() {
  tabs();
  try {
    const r = await fetch('/config.json', { cache: 'no-store' });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    state.config = await r.json();
  } catch (e) {
    $('status').textContent = '';
    showMessage(`Cannot load the demo's settings from ${location.origin}/config.json (${e.message}): ` +
      'is `make demo` running?');
    return;
  }
  const c = state.config;
  $('status').textContent = `TorchServe at ${c.inference_url}, models ${Object.values(c.models).join(', ')}; ` +
    `requests go through this page's server, which adds the key from ${c.key_file.split('/').pop()}.`;
  if (c.error) showMessage(c.error);
  fileInput('photo-drop', 'photo-input', onPhoto);
  fileInput('video-drop', 'video-input', onVideo);
  const video = $('video');
  const tick = () => { videoTick(); if (!video.paused) requestAnimationFrame(tick); };
  video.addEventListener('play', () => requestAnimationFrame(tick));
  video.addEventListener('seeked', () => { videoTick(); refreshVideoBox(); });
  video.addEventListener('timeupdate', videoTick);
  $('photo-why-toggle').addEventListener('change', showWhy);
  $('webcam-start').addEventListener('click', startWebcam);
  $('webcam-stop').addEventListener('click', stopWebcam);
  $('webcam-csv').addEventListener('click', downloadCsv);
  window.addEventListener('pagehide', stopWebcam);
  document.body.dataset.ready = 'true';
}

window.addEventListener('error', (ev) => showMessage(`The page hit a bug: ${ev.message}`));
window.addEventListener('unhandledrejection', (ev) => showMessage(`The page hit a bug: ${ev.reason}`));
init();
