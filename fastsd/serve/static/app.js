// The fastsd page: a client of the server's own A1111 API (/sdapi/v1), nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { initImage: null, polling: null, saved: 0 };
window.fastsdProgressSeen = [];  // every progress value shown (the browser test reads it)

function authHeader() {
  const v = $("auth").value;
  if (!v) return {};
  return { Authorization: v.includes(":") ? "Basic " + btoa(v) : "Bearer " + v };
}

async function api(path, body) {
  const opts = { headers: { "X-Fastsd-Page": "1", ...authHeader() } };  // no login dialog on a 401
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch("/sdapi/v1/" + path, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { /* an empty or non-JSON body */ }
  if (res.status === 401) $("auth-row").hidden = false;
  if (!res.ok) {
    const retry = res.headers.get("Retry-After");
    const detail = (data && data.detail) || res.statusText;
    throw new Error(`${res.status}: ${detail}` + (retry ? ` (retry in ${retry} s)` : ""));
  }
  return data;
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

function fill(select, items, value, label) {
  for (const item of items) {
    const o = document.createElement("option");
    o.value = value(item);
    o.textContent = label(item);
    select.appendChild(o);
  }
}

async function loadLists() {
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
    showError("");
  } catch (e) {
    showError("could not load the server's lists: " + e.message);
  }
}

function request() {
  const num = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: num("steps"), cfg_scale: num("cfg"), seed: num("seed"), width: num("width"), height: num("height"),
    batch_size: num("batch"), n_iter: 1, override_settings: { sd_model_checkpoint: $("model").value, sd_vae: $("vae").value },
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

async function pollProgress() {
  try {
    const p = await api("progress");
    if (!state.polling) return;
    if (p.state.job) {
      $("progress").value = p.progress;
      window.fastsdProgressSeen.push(p.progress);
      $("status").textContent = `${p.textinfo} - ${Math.round(p.progress * 100)}%` +
        (p.eta_relative > 0 ? `, about ${Math.ceil(p.eta_relative)} s left` : "");
    } else {
      $("status").textContent = p.state.queued ? `waiting: ${p.state.queued} jobs in the queue` : "waiting";
    }
    if (p.current_image) {
      $("preview").src = "data:image/png;base64," + p.current_image;
      $("preview").hidden = false;
    }
  } catch (e) { /* the next poll tries again */ }
}

function addToGallery(images, info) {
  images.forEach((b64, i) => {
    const seed = info.all_seeds[i];
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = info.infotexts[i];
    const cap = document.createElement("figcaption");
    const pre = document.createElement("pre");
    pre.className = "infotext";
    pre.textContent = info.infotexts[i];
    const a = document.createElement("a");
    a.href = img.src;
    a.download = `${String(state.saved++).padStart(5, "0")}-${seed}.png`;
    a.textContent = "Download " + a.download;
    cap.append(pre, a);
    fig.append(img, cap);
    $("gallery").prepend(fig);
  });
}

async function generate(ev) {
  ev.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  state.polling = setInterval(pollProgress, 250);
  try {
    const res = await api(state.initImage ? "img2img" : "txt2img", request());
    const info = JSON.parse(res.info);
    addToGallery(res.images, info);
    $("progress").value = 1;
    $("status").textContent = info.interrupted ? "interrupted" : `done: ${res.images.length} image(s)`;
    if (info.warnings.length) showError("note: " + info.warnings.join("; "));
  } catch (e) {
    showError(e.message);
    $("status").textContent = "";
  } finally {
    clearInterval(state.polling);
    state.polling = null;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("preview").hidden = true;
  }
}

function readInitImage() {
  const file = $("init-image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.initImage = reader.result.split(",")[1];
    $("init-preview").src = reader.result;
    $("init-preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("interrupt", {}).catch((e) => showError(e.message)));
$("lora-add").addEventListener("click", () => {
  if ($("lora").value) $("prompt").value += ` <lora:${$("lora").value}:${$("lora-weight").value}>`;
});
$("init-image").addEventListener("change", readInitImage);
$("init-clear").addEventListener("click", () => {
  state.initImage = null;
  $("init-image").value = "";
  $("init-preview").hidden = true;
});
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
$("auth").addEventListener("change", loadLists);
loadLists();
