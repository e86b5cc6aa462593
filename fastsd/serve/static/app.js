// The fastsd page: a client of the server's own A1111 API (/sdapi/v1), nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
// task: the id of this page's job while it waits or runs (A1111's force_task_id), else null;
// ready: the server's lists are loaded (Generate waits for them)
const state = { initImage: null, polling: null, saved: 0, task: null, previewId: -1, ready: false };

function authHeader() {
  const v = $("auth").value;
  if (!v) return {};
  return { Authorization: v.includes(":") ? "Basic " + btoa(v) : "Bearer " + v };
}

async function api(path, body) {  // path: under /sdapi/v1/, or from the root when it starts with "/"
  const opts = { headers: { "X-Fastsd-Page": "1", ...authHeader() } };  // no login dialog on a 401
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path.startsWith("/") ? path : "/sdapi/v1/" + path, opts);
  } catch (e) {  // no answer at all (the browser says only "Failed to fetch")
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
    const [samplers, schedulers, models, options, loras, upscalers, vaes] = await Promise.all(
      [api("samplers"), api("schedulers"), api("sd-models"), api("options"), api("loras"), api("upscalers"),
       api("sd-vae")]);
    fill($("sampler"), samplers, (s) => s.name, (s) => s.name);
    $("sampler").value = "Euler a";
    fill($("scheduler"), schedulers, (s) => s.label, (s) => s.label);
    $("scheduler").value = "Automatic";
    fill($("model"), models, (m) => m.title, (m) => m.model_name);
    fill($("hr-checkpoint"), models, (m) => m.title, (m) => m.model_name);  // A1111's "Hires checkpoint"
    $("model").value = options.sd_model_checkpoint;
    fill($("vae"), vaes, (v) => v.model_name, (v) => v.model_name);  // after A1111's Automatic and None
    $("vae").value = options.sd_vae;
    fill($("lora"), loras, (l) => l.name, (l) => l.name);
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

function request() {
  num("seed");
  const seed = $("seed").value;  // above 2**53 a JS number loses digits: sent as text (the server reads it)
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    scheduler: $("scheduler").value, steps: num("steps"), cfg_scale: num("cfg"),
    seed: Number.isSafeInteger(Number(seed)) ? Number(seed) : seed, width: num("width"), height: num("height"),
    batch_size: num("batch"), n_iter: 1,
    override_settings: { sd_model_checkpoint: $("model").value, sd_vae: $("vae").value },
  };
  if (state.initImage) {
    body.init_images = [state.initImage];
    body.denoising_strength = num("strength");
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
    $("interrupt").disabled = !p.active;
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

function addToGallery(images, info) {
  const batch = document.createDocumentFragment();  // in seed order, before the earlier results
  images.forEach((b64, i) => {
    const text = info.infotexts[i];
    // the seed as the infotext writes it (all_seeds, read as JS numbers, lose digits above 2**53)
    const seed = text.split("\n").pop().match(/(?:^|, )Seed: (\d+)/)?.[1] ?? info.all_seeds[i];
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = text;
    const cap = document.createElement("figcaption");
    const pre = document.createElement("pre");
    pre.className = "infotext";
    pre.textContent = text;
    const a = document.createElement("a");
    a.href = img.src;
    a.download = `${String(state.saved++).padStart(5, "0")}-${seed}.png`;
    a.textContent = "Download " + a.download;
    cap.append(pre, a);
    fig.append(img, cap);
    batch.append(fig);
  });
  $("gallery").prepend(batch);
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
  try {
    const res = await api(state.initImage ? "img2img" : "txt2img", { ...request(), force_task_id: state.task });
    const info = JSON.parse(res.info);
    addToGallery(res.images, info);
    $("progress").value = 1;
    $("status").textContent = info.interrupted ? "interrupted" : `done: ${res.images.length} image(s)`;
    if (info.warnings.length) show("note", "note: " + info.warnings.join("; "));
  } catch (e) {
    show("error", e.message);
    $("progress").value = 0;
    $("status").textContent = "";
  } finally {
    clearInterval(state.polling);
    state.polling = null;
    state.task = null;
    setGenerate();
    $("interrupt").disabled = true;
    $("preview").hidden = true;
  }
}

function setMode() {  // hires fix is txt2img's: off, with a note, while an init image is loaded
  const img2img = state.initImage !== null;
  $("hires").disabled = img2img;
  $("hires-set").disabled = img2img || !$("hires").checked;  // (the legend's checkbox stays usable)
  $("hires-note").hidden = !img2img;
  $("generate").textContent = img2img ? "Generate (img2img)" : "Generate (txt2img)";
}

function readInitImage() {
  const file = $("init-image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.initImage = reader.result.split(",")[1];
    $("init-preview").src = reader.result;
    $("init-preview").hidden = false;
    setMode();
  };
  reader.readAsDataURL(file);
}

$("form").addEventListener("submit", generate);
// the page's Interrupt is enabled only while its own job runs (/interrupt stops the running job, whoever's)
$("interrupt").addEventListener("click", () => api("interrupt", {}).catch((e) => show("error", e.message)));
$("lora-add").addEventListener("click", () => {
  if ($("lora").value) $("prompt").value += ` <lora:${$("lora").value}:${num("lora-weight")}>`;
});
$("hires").addEventListener("change", setMode);
$("init-image").addEventListener("change", readInitImage);
$("init-clear").addEventListener("click", () => {
  state.initImage = null;
  $("init-image").value = "";
  $("init-preview").hidden = true;
  setMode();
});
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
$("auth").addEventListener("change", loadLists);
window.addEventListener("beforeunload", (e) => {  // leaving cancels this page's job: the browser asks first
  if (state.task !== null) {
    e.preventDefault();
    e.returnValue = true;
  }
});
document.addEventListener("keydown", (e) => {  // A1111's keys: Ctrl+Enter generates, Esc interrupts
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    if (!$("generate").disabled) $("form").requestSubmit();
  } else if (e.key === "Escape" && !$("interrupt").disabled) {
    $("interrupt").click();
  }
});
setMode();
loadLists();
