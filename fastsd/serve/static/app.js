// The fastsd page: a client of the server's own A1111 API (/sdapi/v1), nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
// task: the id of this page's job while it waits or runs (A1111's force_task_id), else null;
// ready: the server's lists are loaded (Generate waits for them)
// saved: the images downloaded names count on (kept across reloads, as the gallery); shown: the lightbox's figure
// abort: lets the page's generation request go (Interrupt while its job waits: the server then drops it)
const state = { initImage: null, polling: null, saved: 0, task: null, previewId: -1, ready: false, shown: null,
                abort: null, active: false };
const STORE = { gallery: "fastsd-gallery", saved: "fastsd-saved" };  // localStorage keys
const KEEP = { images: 24, chars: 4_000_000 };  // the gallery this browser keeps: newest first, within these
// The inpainting mask (A1111's Inpaint / Inpaint upload): #mask-canvas has the init image's own pixels, its alpha the
// mask (drawn in TINT, shown half transparent over the image). history: what made it, in order: strokes ({erase,
// width: in image pixels, points}) and uploaded mask images ({upload: data URL as given, layer: a canvas}); undo
// drops the last. stroke: the one being painted (its pointerId); empty: no pixel of the canvas is masked.
const mask = { history: [], stroke: null, empty: true };
const TINT = "#e11d48";
// A1111's Settings > img2img options the page has fields for (#options-set): field id -> option name. A field shows
// the server's option (GET /options); a request carries it in override_settings only when it differs from that
const OPTIONS = { "fix-steps": "img2img_fix_steps", "extra-noise": "img2img_extra_noise",
                  "mask-weight": "inpainting_mask_weight", "color-correction": "img2img_color_correction" };

function authHeader() {
  const v = $("auth").value;
  if (!v) return {};
  return { Authorization: v.includes(":") ? "Basic " + btoa(v) : "Bearer " + v };
}

async function api(path, body, signal) {  // path: under /sdapi/v1/, or from the root when it starts with "/"
  const opts = { headers: { "X-Fastsd-Page": "1", ...authHeader() }, signal };  // no login dialog on a 401
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path.startsWith("/") ? path : "/sdapi/v1/" + path, opts);
  } catch (e) {  // no answer at all (the browser says only "Failed to fetch")
    if (signal?.aborted) throw e;  // the page let its request go (the server drops the job)
    throw new Error("cannot reach the server (is it running?)");
  }
  let data = null;
  try { data = await res.json(); } catch (e) { /* an empty or non-JSON body */ }
  if (res.status === 401) $("auth-row").hidden = false;
  // (a full queue's 503 detail already says when to retry, as its Retry-After header does)
  if (!res.ok) throw new Error(`${res.status}: ${(data && data.detail) || res.statusText}`);
  return data;
}

function show(id, msg) {  // the error or the note box
  $(id).textContent = msg;
  $(id).hidden = !msg;
}

function setGenerate() {
  $("generate").disabled = !state.ready || state.task !== null;
}

function fill(select, items, value, label) {
  select.dataset.fixed ??= select.options.length;  // the page's own options stay; the server's are replaced
  select.length = Number(select.dataset.fixed);
  for (const item of items) {
    const o = document.createElement("option");
    o.value = value(item);
    o.textContent = label(item);
    select.appendChild(o);
  }
}

async function loadLists() {
  state.ready = false;
  setGenerate();
  try {
    const [samplers, schedulers, models, options, loras, upscalers, vaes, styles] = await Promise.all(
      [api("samplers"), api("schedulers"), api("sd-models"), api("options"), api("loras"), api("upscalers"),
       api("sd-vae"), api("prompt-styles")]);
    fill($("sampler"), samplers, (s) => s.name, (s) => s.name);
    $("sampler").value = "Euler a";
    fill($("scheduler"), schedulers, (s) => s.label, (s) => s.label);
    $("scheduler").value = "Automatic";
    fill($("model"), models, (m) => m.title, (m) => m.model_name);
    fill($("hr-checkpoint"), models, (m) => m.title, (m) => m.model_name);  // A1111's "Hires checkpoint"
    $("model").value = options.sd_model_checkpoint;
    fill($("vae"), vaes, (v) => v.model_name, (v) => v.model_name);  // after A1111's Automatic and None
    $("vae").value = options.sd_vae;
    for (const [id, key] of Object.entries(OPTIONS)) {  // the server's value is the field's default
      if (options[key] === undefined) continue;
      if ($(id).type === "checkbox") $(id).defaultChecked = $(id).checked = options[key] === true;
      else $(id).defaultValue = $(id).value = String(options[key]);
    }
    fill($("lora"), loras, (l) => l.name, (l) => l.name);
    fill($("styles"), styles, (st) => st.name, (st) => st.name);  // A1111's styles (the server applies them)
    $("styles-row").hidden = styles.length === 0;
    // the --upscaler-dir models after the built-in upscalers (the list's first three, None/Lanczos/Nearest: there)
    fill($("hr-upscaler"), upscalers.filter((u) => u.model_path !== null), (u) => u.name, (u) => u.name);
    state.ready = true;
    show("error", "");
  } catch (e) {
    show("error", "could not load the server's lists: " + e.message);
  }
  setGenerate();
}

function num(id) {  // an empty field runs with its default (the seed's: -1, random), shown in the field
  if ($(id).value === "") $(id).value = $(id).defaultValue;
  return Number($(id).value);
}

// the img2img options whose fields differ from the server's; as A1111's settings, they go with every request (extra
// noise and mask weight reach the hires fix too; an empty field is the server's value)
function changedOptions() {
  const out = {};
  for (const [id, key] of Object.entries(OPTIONS)) {
    const el = $(id);
    if (el.type === "checkbox") {
      if (el.checked !== el.defaultChecked) out[key] = el.checked;
    } else if (num(id) !== Number(el.defaultValue)) {
      out[key] = Number(el.value);
    }
  }
  return out;
}

function request() {
  num("seed");
  const seed = $("seed").value;  // above 2**53 a JS number loses digits: sent as text (the server reads it)
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    scheduler: $("scheduler").value, steps: num("steps"), cfg_scale: num("cfg"),
    seed: Number.isSafeInteger(Number(seed)) ? Number(seed) : seed, width: num("width"), height: num("height"),
    batch_size: num("batch"), n_iter: num("count"),
    styles: Array.from($("styles").selectedOptions, (o) => o.value),
    override_settings: { sd_model_checkpoint: $("model").value, sd_vae: $("vae").value, ...changedOptions() },
  };
  if (state.initImage) {
    body.init_images = [state.initImage];
    body.denoising_strength = num("strength");
    body.resize_mode = Number($("resize-mode").value);
    const m = maskImage();
    if (m) {  // A1111's inpainting: white = repaint; no mask painted: plain img2img
      Object.assign(body, { mask: m, mask_blur: num("mask-blur"), inpainting_mask_invert: Number($("mask-mode").value),
                            inpainting_fill: Number($("masked-content").value),
                            inpaint_full_res: $("inpaint-area").value === "1",
                            inpaint_full_res_padding: num("inpaint-padding") });
    }
  } else if ($("hires").checked) {  // A1111's hires fix (txt2img only)
    Object.assign(body, { enable_hr: true, hr_upscaler: $("hr-upscaler").value, hr_scale: num("hr-scale"),
                          hr_second_pass_steps: num("hr-steps"), denoising_strength: num("hr-strength"),
                          hr_checkpoint_name: $("hr-checkpoint").value });
  }
  return body;
}

async function pollProgress() {  // this page's own job (A1111's /internal/progress), not whichever job runs
  const task = state.task;
  try {
    const p = await api("/internal/progress", { id_task: task, id_live_preview: state.previewId, live_preview: true });
    if (state.task !== task) return;  // the job ended meanwhile
    state.active = p.active;
    $("interrupt").disabled = !p.active && !p.queued;  // waiting: Interrupt cancels the job
    $("skip").disabled = !p.active;
    if (p.active) {
      $("progress").value = p.progress;
      $("status").textContent = `${p.textinfo} - ${Math.round(p.progress * 100)}%` +
        (p.eta > 0 ? `, about ${Math.ceil(p.eta)} s left` : "");
    } else {
      $("status").textContent = p.queued ? `waiting: ${p.jobs_ahead} job${p.jobs_ahead === 1 ? "" : "s"} ahead`
                                         : "waiting";
    }
    if (p.live_preview) {
      state.previewId = p.id_live_preview;
      $("preview").src = p.live_preview;
      $("preview").hidden = false;
    }
  } catch (e) { /* the next poll tries again */ }
}

function imageType(b64) {  // the server answers in its samples_format: PNG, JPEG or WEBP
  if (b64.startsWith("/9j/")) return ["image/jpeg", "jpg"];
  if (b64.startsWith("UklGR")) return ["image/webp", "webp"];
  return ["image/png", "png"];
}

function figureFor(entry) {  // entry: {b64, text (the infotext), name (the download's)}
  const fig = document.createElement("figure");
  fig.dataset.seed = entry.seed;
  const img = document.createElement("img");
  img.src = `data:${imageType(entry.b64)[0]};base64,${entry.b64}`;
  img.alt = entry.text;
  img.addEventListener("click", () => openLightbox(fig));
  const cap = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.className = "infotext";
  pre.textContent = entry.text;
  const a = document.createElement("a");
  a.href = img.src;
  a.download = entry.name;
  a.textContent = "Download " + a.download;
  const copy = button("Copy infotext", "copy", () => copyText(entry.text, copy));
  const send = button("Send to img2img", "send", () => sendToImg2img(entry, img));
  const inpaint = button("Send to inpaint", "send-inpaint", () => sendToImg2img(entry, img, true));
  const row = document.createElement("div");
  row.className = "row";
  row.append(copy, send, inpaint, a);
  cap.append(pre, row);
  fig.append(img, cap);
  return fig;
}

function button(text, cls, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.addEventListener("click", onclick);
  return b;
}

function addToGallery(images, info) {
  const entries = images.map((b64, i) => {
    const text = info.infotexts[i];
    // the seed as the infotext writes it (all_seeds, read as JS numbers, lose digits above 2**53)
    const seed = text.split("\n").pop().match(/(?:^|, )Seed: (\d+)/)?.[1] ?? String(info.all_seeds[i]);
    return { b64, text, seed, name: `${String(state.saved++).padStart(5, "0")}-${seed}.${imageType(b64)[1]}` };
  });
  const batch = document.createDocumentFragment();  // in seed order, before the earlier results
  for (const entry of entries) batch.append(figureFor(entry));
  $("gallery").prepend(batch);
  $("gallery-bar").hidden = false;
  saveGallery(entries);
}

function stored() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE.gallery) || "[]");
    return Array.isArray(list) ? list.filter((e) => e && typeof e.b64 === "string" && typeof e.text === "string") : [];
  } catch (e) {
    return [];  // storage off (a private window's policy) or a value this page did not write
  }
}

function saveGallery(entries) {  // the newest first, within KEEP; the browser's quota drops the oldest too
  let list = [...entries, ...stored()].slice(0, KEEP.images);
  let chars = 0;
  list = list.filter((e) => (chars += e.b64.length + e.text.length) <= KEEP.chars);
  for (;;) {
    try {
      localStorage.setItem(STORE.gallery, JSON.stringify(list));
      localStorage.setItem(STORE.saved, String(state.saved));
      return;
    } catch (e) {  // QuotaExceededError (or storage off): keep fewer
      if (!list.length) return;
      list.pop();
    }
  }
}

function restoreGallery() {  // the images of earlier visits, as they were shown
  const list = stored();
  for (const entry of list) $("gallery").append(figureFor(entry));
  $("gallery-bar").hidden = list.length === 0;
  try { state.saved = Math.max(Number(localStorage.getItem(STORE.saved)) || 0, list.length); } catch (e) { /* off */ }
}

function clearGallery() {
  $("gallery").replaceChildren();
  $("gallery-bar").hidden = true;
  try {
    localStorage.removeItem(STORE.gallery);
  } catch (e) { /* storage off */ }
}

async function copyText(text, btn) {  // the clipboard API needs a secure context (127.0.0.1 is; a LAN address not)
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = "Copy infotext"; }, 1500);
}

function parseInfotext(text) {  // A1111's parse_generation_parameters, the keys the page has fields for
  const lines = text.trim().split("\n");
  const param = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
  const params = {};
  const last = lines[lines.length - 1] ?? "";
  const found = [...last.matchAll(param)];
  if (found.length >= 3) {
    lines.pop();
    for (const [, k, v] of found) params[k.trim()] = v.startsWith('"') ? JSON.parse(v) : v.trim();
  }
  const neg = lines.findIndex((l) => l.startsWith("Negative prompt:"));
  const prompt = (neg < 0 ? lines : lines.slice(0, neg)).join("\n");
  const negative = neg < 0 ? "" : lines.slice(neg).join("\n").slice("Negative prompt:".length).trim();
  return { prompt, negative, params };
}

function setSelect(id, value) {  // only to an option the server listed
  if (Array.from($(id).options).some((o) => o.value === value)) $(id).value = value;
}

function useParameters(text) {  // an infotext's values into the fields (A1111's paste / "send to"); false: none
  const { prompt, negative, params } = parseInfotext(text);
  if (!Object.keys(params).length) return false;
  $("prompt").value = prompt;
  $("negative").value = negative;
  for (const [key, id] of [["Steps", "steps"], ["CFG scale", "cfg"], ["Seed", "seed"], ["Extra noise", "extra-noise"],
                           ["Conditional mask weight", "mask-weight"]]) {  // (the last two: A1111's option keys)
    if (params[key] !== undefined) $(id).value = params[key];
  }
  const size = /^(\d+)x(\d+)$/.exec(params.Size ?? "");
  if (size) [$("width").value, $("height").value] = [size[1], size[2]];
  if (params.Sampler) setSelect("sampler", params.Sampler);
  setSelect("scheduler", params["Schedule type"] ?? "Automatic");
  return true;
}

function setInitImage(dataUrl) {
  state.initImage = dataUrl.split(",")[1];
  mask.history = [];  // a new image: no mask yet (the canvas takes the image's size once it is loaded)
  $("init-preview").src = dataUrl;
  $("init-preview").hidden = false;
  $("mask-editor").hidden = false;
  drawMask();
  setMode();
}

function clearInitImage() {
  state.initImage = null;
  mask.history = [];
  $("init-image").value = "";
  $("init-preview").hidden = true;
  $("init-preview").removeAttribute("src");
  $("mask-editor").hidden = true;
  drawMask();
  setMode();
}

// A1111's "Send to img2img" / "Send to inpaint": the image and its parameters; inpaint: the mask to paint in view
function sendToImg2img(entry, img, inpaint = false) {
  useParameters(entry.text);
  $("width").value = img.naturalWidth || $("width").value;  // img2img at the image's own size
  $("height").value = img.naturalHeight || $("height").value;
  $("init-image").value = "";
  setInitImage(img.src);
  (inpaint ? $("mask-stage") : $("prompt")).scrollIntoView({ block: "nearest" });
}

// ---- the inpainting mask ----

function fitInitImage() {  // shown as wide as the box allows, within 480 px high; a small image scaled up to paint on
  const img = $("init-preview");
  if (!img.naturalWidth || $("mask-editor").hidden) return;
  const room = $("mask-editor").clientWidth;
  const width = Math.min(room, 480 * img.naturalWidth / img.naturalHeight, Math.max(img.naturalWidth, 320));
  img.style.width = `${Math.max(1, Math.floor(width))}px`;
}

function sizeMaskCanvas() {  // the canvas has the init image's own pixels (CSS stretches it over the shown image)
  const img = $("init-preview");
  if (!img.naturalWidth) return;
  fitInitImage();
  const c = $("mask-canvas");
  if (c.width !== img.naturalWidth || c.height !== img.naturalHeight) {
    [c.width, c.height] = [img.naturalWidth, img.naturalHeight];
    drawMask();
  }
}

function maskContext() {
  return $("mask-canvas").getContext("2d", { willReadFrequently: true });
}

function drawStroke(ctx, s, from = 0) {  // from: the first new point (a stroke being painted is drawn piece by piece)
  const p = s.points;
  ctx.save();
  ctx.globalCompositeOperation = s.erase ? "destination-out" : "source-over";
  ctx.fillStyle = ctx.strokeStyle = TINT;
  ctx.lineWidth = s.width;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  if (p.length === 1) {
    ctx.arc(p[0][0], p[0][1], s.width / 2, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.moveTo(...p[Math.max(0, from - 1)]);
    for (let i = Math.max(1, from); i < p.length; i++) ctx.lineTo(...p[i]);
    ctx.stroke();
  }
  ctx.restore();
}

function drawMask() {  // the canvas from the history; then whether anything is masked
  const c = $("mask-canvas");
  const ctx = maskContext();
  ctx.clearRect(0, 0, c.width, c.height);
  for (const h of mask.history) {
    if (h.upload) {  // an uploaded mask replaces what was painted before it
      ctx.clearRect(0, 0, c.width, c.height);
      ctx.drawImage(h.layer, 0, 0, c.width, c.height);
    } else {
      drawStroke(ctx, h);
    }
  }
  maskChanged();
}

function maskPixels() {  // the canvas' alpha as 0 / 255 (A1111 thresholds the mask at 128 too)
  const c = $("mask-canvas");
  const data = maskContext().getImageData(0, 0, c.width, c.height);
  let any = false;
  const d = data.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 3] >= 128 ? 255 : 0;
    any ||= v === 255;
    d[i] = d[i + 1] = d[i + 2] = v;
    d[i + 3] = 255;
  }
  return { data, any };
}

function maskChanged() {
  mask.empty = state.initImage === null || !mask.history.length || !maskPixels().any;
  $("inpaint-set").disabled = mask.empty;
  $("mask-undo").disabled = !mask.history.length;
  $("mask-clear").disabled = !mask.history.length;
  setMode();
}

function maskImage() {  // the request's mask: a black and white PNG at the init image's size, or null (none painted)
  if (mask.empty) return null;
  const last = mask.history[mask.history.length - 1];
  if (last.upload) return last.upload;  // an uploaded mask is sent as it is (A1111's Inpaint upload)
  const { data } = maskPixels();
  const out = Object.assign(document.createElement("canvas"), { width: data.width, height: data.height });
  out.getContext("2d").putImageData(data, 0, 0);
  return out.toDataURL("image/png");
}

function undoMask() {
  if (mask.stroke || !mask.history.length) return;
  mask.history.pop();
  drawMask();
}

function clearMask() {
  if (mask.stroke) return;
  mask.history = [];
  drawMask();
}

function maskPoint(e) {  // a pointer's place in the image's own pixels (the canvas is shown scaled)
  const c = $("mask-canvas");
  const r = c.getBoundingClientRect();
  return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
}

function brushCursor(e) {  // a circle the brush's size under the mouse (a finger hides it anyway)
  const cur = $("brush-cursor");
  if (!e || e.pointerType === "touch") {
    cur.hidden = true;
    return;
  }
  const c = $("mask-canvas");
  const size = `${Number($("brush-size").value)}px`;
  Object.assign(cur.style, { left: `${e.clientX - c.getBoundingClientRect().left}px`,
                             top: `${e.clientY - c.getBoundingClientRect().top}px`, width: size, height: size });
  cur.hidden = false;
}

function strokeStart(e) {
  if (mask.stroke || (e.pointerType === "mouse" && e.button !== 0) || !$("init-preview").naturalWidth) return;
  e.preventDefault();
  sizeMaskCanvas();
  const c = $("mask-canvas");
  try { c.setPointerCapture(e.pointerId); } catch (err) { /* (a pointer the browser no longer tracks) */ }
  const scale = c.width / c.getBoundingClientRect().width;  // the brush is sized on the screen
  mask.stroke = { erase: $("mask-eraser").checked, width: Math.max(1, Number($("brush-size").value) * scale),
                  points: [maskPoint(e)], pointerId: e.pointerId };
  mask.history.push(mask.stroke);
  drawStroke(maskContext(), mask.stroke);
}

function strokeMove(e) {
  brushCursor(e);
  const s = mask.stroke;
  if (!s || e.pointerId !== s.pointerId) return;
  e.preventDefault();
  const from = s.points.length;
  const all = e.getCoalescedEvents?.() ?? [];  // (the moves since the last event; none in a made-up event)
  for (const ev of all.length ? all : [e]) s.points.push(maskPoint(ev));
  if (s.points.length > from) drawStroke(maskContext(), s, from);
}

function strokeEnd(e) {
  const s = mask.stroke;
  if (!s || e.pointerId !== s.pointerId) return;
  mask.stroke = null;
  delete s.pointerId;
  maskChanged();
}

function readMaskFile() {  // A1111's Inpaint upload: shown over the image, sent as it is
  const file = $("mask-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      sizeMaskCanvas();
      const c = $("mask-canvas");
      // the mask as the server reads it: its transparency when it has any, else its grey levels; stretched
      const layer = Object.assign(document.createElement("canvas"), { width: c.width, height: c.height });
      const ctx = layer.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0, c.width, c.height);
      const data = ctx.getImageData(0, 0, c.width, c.height);
      const d = data.data;
      let alpha = false;
      for (let i = 3; i < d.length && !alpha; i += 4) alpha = d[i] < 255;
      for (let i = 0; i < d.length; i += 4) {
        d[i + 3] = alpha ? d[i + 3] : Math.round(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]);
        [d[i], d[i + 1], d[i + 2]] = [0xe1, 0x1d, 0x48];  // TINT
      }
      ctx.putImageData(data, 0, 0);
      mask.history.push({ upload: reader.result, layer });
      $("mask-file").value = "";  // (the same file can be given again)
      drawMask();
    };
    img.onerror = () => show("error", "the mask file is not an image the browser can read");
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function figures() {
  return Array.from($("gallery").children);
}

function openLightbox(fig) {  // the full-size image; clicking it selects it (the seed button's)
  for (const f of figures()) f.classList.toggle("selected", f === fig);
  state.shown = fig;
  const all = figures();
  $("lightbox-img").src = fig.querySelector("img").src;
  $("lightbox-img").classList.remove("full");
  $("lightbox-count").textContent = `${all.indexOf(fig) + 1} / ${all.length}`;
  if (!$("lightbox").open) $("lightbox").showModal();
}

function stepLightbox(by) {
  const all = figures();
  const i = all.indexOf(state.shown);
  if (i >= 0 && all.length) openLightbox(all[(i + by + all.length) % all.length]);
}

function reuseSeed() {  // A1111's ♻: the selected image's seed, else the newest image's
  const fig = $("gallery").querySelector("figure.selected") ?? $("gallery").querySelector("figure");
  if (fig) $("seed").value = fig.dataset.seed;
}

function newTaskId() {  // A1111's form: task(random letters)
  return "task(" + Array.from(crypto.getRandomValues(new Uint32Array(3)), (n) => n.toString(36)).join("") + ")";
}

async function generate(ev) {
  ev.preventDefault();
  if (state.task !== null) return;
  show("error", "");
  show("note", "");
  state.task = newTaskId();
  state.previewId = -1;
  setGenerate();
  $("progress").value = 0;
  $("status").textContent = "waiting";
  state.polling = setInterval(pollProgress, 250);
  state.abort = new AbortController();
  state.active = false;
  try {
    const res = await api(state.initImage ? "img2img" : "txt2img", { ...request(), force_task_id: state.task },
                          state.abort.signal);
    const info = JSON.parse(res.info);
    addToGallery(res.images, info);
    $("progress").value = 1;
    $("status").textContent = info.interrupted ? "interrupted" : `done: ${res.images.length} image(s)`;
    if (info.warnings.length) show("note", "note: " + info.warnings.join("; "));
  } catch (e) {
    if (!state.abort.signal.aborted) show("error", e.message);
    $("progress").value = 0;
    $("status").textContent = state.abort.signal.aborted ? "cancelled" : "";
  } finally {
    clearInterval(state.polling);
    state.polling = null;
    state.task = null;
    setGenerate();
    $("interrupt").disabled = $("skip").disabled = true;
    $("preview").hidden = true;
  }
}

function setMode() {  // hires fix is txt2img's: off, with a note, while an init image is loaded
  const img2img = state.initImage !== null;
  $("hires").disabled = img2img;
  $("hires-set").disabled = img2img || !$("hires").checked;  // (the legend's checkbox stays usable)
  $("hires-note").hidden = !img2img;
  $("resize-mode").disabled = !img2img;
  $("generate").textContent = !img2img ? "Generate (txt2img)" : mask.empty ? "Generate (img2img)" : "Generate (inpaint)";
}

function readInitImage() {
  const file = $("init-image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.readAsDataURL(file);
}

function dropped(e) {  // an image dropped on the img2img box: a file, or a gallery image (its data: URL)
  e.preventDefault();
  $("img2img-set").classList.remove("drop");
  const file = Array.from(e.dataTransfer.files).find((f) => f.type.startsWith("image/"));
  const url = e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain");
  if (file) {
    const files = new DataTransfer();
    files.items.add(file);
    $("init-image").files = files.files;
    readInitImage();
  } else if (/^data:image\/[a-z]+;base64,/.test(url.trim())) {
    $("init-image").value = "";
    setInitImage(url.trim());
  }
}

$("form").addEventListener("submit", generate);
$("read-params").addEventListener("click", () => {
  if (!useParameters($("prompt").value)) show("note", "note: the prompt holds no infotext parameters to read");
});
$("img2img-set").addEventListener("dragover", (e) => { e.preventDefault(); $("img2img-set").classList.add("drop"); });
$("img2img-set").addEventListener("dragleave", () => $("img2img-set").classList.remove("drop"));
$("img2img-set").addEventListener("drop", dropped);
// an image dropped anywhere else would replace the page (and its job) with the image: the browser's default
for (const type of ["dragover", "drop"]) {
  document.addEventListener(type, (e) => { if (e.dataTransfer?.types.includes("Files")) e.preventDefault(); });
}
// Interrupt and Skip are enabled while the page's own job runs, and name it: the server stops nobody else's
for (const what of ["interrupt", "skip"]) {
  $(what).addEventListener("click", () => {
    if (state.task === null) return;
    if (what === "interrupt" && !state.active) state.abort.abort();  // still waiting: the server drops it
    else api(what, { id_task: state.task }).catch((e) => show("error", e.message));
  });
}
$("seed-random").addEventListener("click", () => { $("seed").value = "-1"; });
$("seed-reuse").addEventListener("click", reuseSeed);
$("gallery-clear").addEventListener("click", clearGallery);
$("lightbox-img").addEventListener("click", () => $("lightbox-img").classList.toggle("full"));
$("lightbox-prev").addEventListener("click", () => stepLightbox(-1));
$("lightbox-next").addEventListener("click", () => stepLightbox(1));
$("lightbox-close").addEventListener("click", () => $("lightbox").close());
$("lightbox").addEventListener("click", (e) => { if (e.target === $("lightbox")) $("lightbox").close(); });  // backdrop
$("lightbox").addEventListener("keydown", (e) => {
  if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
    e.preventDefault();
    stepLightbox(e.key === "ArrowLeft" ? -1 : 1);
  }
});
$("lora-add").addEventListener("click", () => {
  if ($("lora").value) $("prompt").value += ` <lora:${$("lora").value}:${num("lora-weight")}>`;
});
$("hires").addEventListener("change", setMode);
$("init-image").addEventListener("change", readInitImage);
$("init-clear").addEventListener("click", clearInitImage);
$("init-preview").addEventListener("load", sizeMaskCanvas);
new ResizeObserver(fitInitImage).observe($("mask-editor"));  // a narrower window (a phone turned): the image fits
$("mask-canvas").addEventListener("pointerdown", strokeStart);
$("mask-canvas").addEventListener("pointermove", strokeMove);
$("mask-canvas").addEventListener("pointerup", strokeEnd);
$("mask-canvas").addEventListener("pointercancel", strokeEnd);
$("mask-canvas").addEventListener("lostpointercapture", strokeEnd);
$("mask-canvas").addEventListener("pointerleave", () => brushCursor(null));
$("mask-undo").addEventListener("click", undoMask);
$("mask-clear").addEventListener("click", clearMask);
$("mask-file").addEventListener("change", readMaskFile);
$("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
$("auth").addEventListener("change", loadLists);
window.addEventListener("beforeunload", (e) => {  // leaving cancels this page's job: the browser asks first
  if (state.task !== null) {
    e.preventDefault();
    e.returnValue = true;
  }
});
function typing(el) {  // a field whose Ctrl+Z undoes typing
  return el.isContentEditable || el.tagName === "TEXTAREA" ||
    (el.tagName === "INPUT" && /^(text|number|password|search|email|url|tel)$/.test(el.type));
}

document.addEventListener("keydown", (e) => {  // A1111's keys: Ctrl+Enter generates, Esc interrupts
  if ($("lightbox").open) return;  // (its Esc closes it, nothing more)
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    if (!$("generate").disabled) $("form").requestSubmit();
  } else if ((e.key ?? "").toLowerCase() === "z" && (e.ctrlKey || e.metaKey) && !e.shiftKey && !e.altKey
             && !typing(e.target) && !$("mask-editor").hidden) {  // A1111's Ctrl+Z on its mask; a text field's own undo stays
    e.preventDefault();
    undoMask();
  } else if (e.key === "Escape" && !$("interrupt").disabled) {
    $("interrupt").click();
  }
});
setMode();
restoreGallery();
loadLists();
