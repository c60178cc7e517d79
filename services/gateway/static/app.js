// Snap2Caption web page: calls the gateway's public API from the browser (same origin, no libraries).
//
// Flow: a file (picked, dropped or pasted) goes to POST /v1/analyze as multipart field `file`; a URL goes
// as JSON {"url": ...}; options travel as query parameters. The answer is drawn: boxes over the image
// (placed in percent of the original image's size, so they scale with the displayed image), caption,
// alt text (also the <img alt>), hashtags, timings and models. Feedback goes to POST /v1/feedback.
// Every error is read from the envelope {"error": {"code", "message", "request_id"}}.
"use strict";

(function () {
  const API_KEY_STORAGE = "snap2caption.apiKey";
  const ALL_FEATURES = ["caption", "alt_text", "tags", "objects"];
  const ERROR_TITLES = {
    bad_request: "The request was not understood",
    unsupported_format: "Not a supported image format",
    corrupt_image: "The image is damaged or truncated",
    payload_too_large: "The file is too large",
    image_too_large: "The image has too many pixels",
    url_not_allowed: "That URL is not allowed",
    url_fetch_failed: "The image could not be fetched from that URL",
    unauthorized: "An API key is needed (or the one given is not valid)",
    rate_limited: "Too many requests",
    overloaded: "The service is busy",
    timeout: "The analysis took too long",
    not_found: "Not found",
    internal_error: "Something went wrong on the server",
    network_error: "Could not reach the gateway",
  };

  const $ = (id) => document.getElementById(id);
  const els = {
    fileInput: $("file-input"),
    dropZone: $("drop-zone"),
    urlForm: $("url-form"),
    urlInput: $("url-input"),
    urlSubmit: $("url-submit"),
    maxTags: $("max-tags"),
    minConfidence: $("min-confidence"),
    genderNeutral: $("gender-neutral"),
    apiKey: $("api-key"),
    status: $("status"),
    error: $("error"),
    results: $("results"),
    preview: $("preview"),
    boxes: $("boxes"),
    imageInfo: $("image-info"),
    caption: $("caption"),
    captionConfidence: $("caption-confidence"),
    altText: $("alt-text"),
    tags: $("tags"),
    objects: $("objects"),
    objectsCount: $("objects-count"),
    featureErrors: $("feature-errors"),
    featureErrorList: $("feature-error-list"),
    timings: $("timings"),
    models: $("models"),
    requestId: $("request-id"),
    feedbackForm: $("feedback-form"),
    feedbackCaption: $("feedback-caption"),
    feedbackReason: $("feedback-reason"),
    feedbackSubmit: $("feedback-submit"),
    feedbackStatus: $("feedback-status"),
  };

  let current = null; // the last result shown: {request_id, caption, ...}
  let sequence = 0; // answers to superseded requests are dropped
  let objectUrl = null;

  // ------------------------------------------------------------------ API key (this tab only)

  try {
    els.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  } catch (_) {
    // Storage disabled: the field still works for this page view.
  }
  els.apiKey.addEventListener("input", () => {
    try {
      if (els.apiKey.value) sessionStorage.setItem(API_KEY_STORAGE, els.apiKey.value);
      else sessionStorage.removeItem(API_KEY_STORAGE);
    } catch (_) {
      // Storage disabled: nothing to keep.
    }
  });

  function authHeaders() {
    const key = els.apiKey.value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // ------------------------------------------------------------------ requests

  function selectedFeatures() {
    return Array.from(document.querySelectorAll('input[name="feature"]:checked')).map((el) => el.value);
  }

  // The options the user changed from the defaults: {features?, max_tags?, min_confidence?, gender_neutral?}.
  function chosenOptions() {
    const options = {};
    const features = selectedFeatures();
    if (features.length !== ALL_FEATURES.length) options.features = features.join(",");
    if (els.maxTags.value !== "") options.max_tags = Number(els.maxTags.value);
    if (els.minConfidence.value !== "") options.min_confidence = Number(els.minConfidence.value);
    if (els.genderNeutral.checked) options.gender_neutral = true;
    return options;
  }

  // Uploads carry the options in the query string (JSON requests carry them in the body).
  function queryString(options) {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(options)) params.set(key, String(value));
    const text = params.toString();
    return text ? "?" + text : "";
  }

  // Read an error answer as {status, code, message, request_id}, whatever its body is.
  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const envelope = body && typeof body.error === "object" && body.error ? body.error : null;
    return {
      status: response.status,
      code: (envelope && envelope.code) || "http_" + response.status,
      message: (envelope && envelope.message) || response.statusText || "request failed",
      request_id: (envelope && envelope.request_id) || response.headers.get("X-Request-ID"),
      retry_after: response.headers.get("Retry-After"),
    };
  }

  async function callApi(path, init) {
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw { status: 0, code: "network_error", message: String(err && err.message ? err.message : err) };
    }
    if (!response.ok) throw await readError(response);
    return response.json();
  }

  // source: {file} or {url}.
  async function analyze(source) {
    if (selectedFeatures().length === 0) {
      showError({ code: "bad_request", message: "Choose at least one feature under Options." });
      return;
    }
    const options = chosenOptions();
    let path = "/v1/analyze";
    let body;
    let previewSrc;
    const headers = { Accept: "application/json" };
    if (source.file) {
      if (objectUrl) URL.revokeObjectURL(objectUrl);
      objectUrl = URL.createObjectURL(source.file);
      previewSrc = objectUrl;
      body = new FormData();
      body.append("file", source.file, source.file.name || "pasted-image");
      path += queryString(options);
    } else {
      previewSrc = source.url;
      body = JSON.stringify(Object.assign({ url: source.url }, options));
      headers["Content-Type"] = "application/json";
    }
    const mine = ++sequence;
    clearError();
    setBusy(true, "Analyzing…");
    try {
      const result = await callApi(path, {
        method: "POST",
        headers: Object.assign(headers, authHeaders()),
        body: body,
      });
      if (mine !== sequence) return;
      render(result, previewSrc);
      setStatus(result.caption ? "Analysis done: " + result.caption.text : "Analysis done.");
    } catch (err) {
      if (mine !== sequence) return;
      els.results.hidden = true;
      setStatus("");
      showError(err);
    } finally {
      if (mine === sequence) setBusy(false);
    }
  }

  function analyzeFile(file) {
    if (file) analyze({ file: file });
  }

  // ------------------------------------------------------------------ rendering

  function setBusy(busy, message) {
    els.results.setAttribute("aria-busy", busy ? "true" : "false");
    els.urlSubmit.disabled = busy;
    if (message !== undefined) setStatus(message);
  }

  function setStatus(text) {
    els.status.textContent = text;
  }

  function clearError() {
    els.error.hidden = true;
    els.error.textContent = "";
  }

  function describeError(err) {
    const title = ERROR_TITLES[err.code] || "Request failed";
    const where = err.status ? " (" + err.status + " " + err.code + ")" : "";
    let text = title + where + ": " + (err.message || "");
    if (err.retry_after) text += " Try again in " + err.retry_after + " s.";
    return text;
  }

  function showError(err) {
    els.error.textContent = "";
    const line = document.createElement("p");
    line.className = "error-message";
    line.textContent = describeError(err);
    els.error.appendChild(line);
    if (err.request_id) {
      const rid = document.createElement("p");
      rid.className = "error-request-id";
      rid.append("Request id: ");
      const code = document.createElement("code");
      code.textContent = err.request_id;
      rid.appendChild(code);
      els.error.appendChild(rid);
    }
    els.error.dataset.code = err.code || "";
    els.error.hidden = false;
  }

  function percent(value) {
    return (value * 100).toFixed(1) + "%";
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  function addItem(list, text, tag) {
    const li = document.createElement(tag || "li");
    li.textContent = text;
    list.appendChild(li);
    return li;
  }

  function fillDl(dl, entries) {
    clear(dl);
    for (const [key, value] of entries) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dl.append(dt, dd);
    }
  }

  function describeModel(value) {
    if (value && typeof value === "object") {
      const name = value.name || "";
      const version = value.version !== undefined ? " v" + value.version : "";
      const backend = value.backend ? " (" + value.backend + ")" : "";
      return (name + version + backend).trim() || JSON.stringify(value);
    }
    return String(value);
  }

  function drawBoxes(result) {
    clear(els.boxes);
    const width = result.image && result.image.width;
    const height = result.image && result.image.height;
    if (!width || !height) return;
    // Boxes are in original-image pixels (after EXIF orientation); the browser shows the image in that
    // same orientation, so percent of the original size is percent of the displayed size.
    for (const obj of result.objects || []) {
      const b = obj.box;
      const x1 = Math.max(0, Math.min(width, b.x1));
      const y1 = Math.max(0, Math.min(height, b.y1));
      const x2 = Math.max(x1, Math.min(width, b.x2));
      const y2 = Math.max(y1, Math.min(height, b.y2));
      const box = document.createElement("div");
      box.className = "box";
      box.style.left = (100 * x1) / width + "%";
      box.style.top = (100 * y1) / height + "%";
      box.style.width = (100 * (x2 - x1)) / width + "%";
      box.style.height = (100 * (y2 - y1)) / height + "%";
      box.dataset.label = obj.label;
      const label = document.createElement("span");
      label.className = "box-label";
      label.textContent = obj.label + " " + percent(obj.score);
      box.appendChild(label);
      els.boxes.appendChild(box);
    }
  }

  // Why a feature has no value: it failed (listed in `errors`) or was not asked for.
  function missing(result, feature) {
    return (result.errors || []).some((e) => e.feature === feature) ? "unavailable (see below)" : "not asked for";
  }

  function render(result, previewSrc) {
    current = result;
    const caption = result.caption || null;
    const alt = result.alt_text || null;

    // A caption of an image outside the captioner's training domain is never used as alt text.
    const trusted = caption && caption.in_domain !== false ? caption.text : "";
    els.preview.alt = (alt && alt.text) || trusted || "Analysed image";
    els.preview.src = previewSrc;
    const info = result.image || {};
    els.imageInfo.textContent =
      (info.width || "?") + " × " + (info.height || "?") + (info.format ? " " + info.format : "");
    drawBoxes(result);

    els.caption.textContent = caption ? caption.text : missing(result, "caption");
    els.captionConfidence.textContent =
      (caption && typeof caption.confidence === "number" ? "Confidence " + percent(caption.confidence) : "") +
      (caption && caption.note ? " — " + caption.note : "");
    els.altText.textContent = alt
      ? alt.text + (alt.source ? " (from " + alt.source + ")" : "")
      : missing(result, "alt_text");

    clear(els.tags);
    for (const tag of result.tags || []) {
      const li = addItem(els.tags, tag.hashtag || "#" + tag.name);
      li.title = tag.name + " " + percent(tag.score);
    }
    if (!(result.tags || []).length) addItem(els.tags, result.tags ? "none" : missing(result, "tags"));

    clear(els.objects);
    for (const obj of result.objects || []) {
      const b = obj.box;
      addItem(
        els.objects,
        obj.label + " " + percent(obj.score) + " at (" + Math.round(b.x1) + ", " + Math.round(b.y1) +
          ")–(" + Math.round(b.x2) + ", " + Math.round(b.y2) + ")",
      );
    }
    if (!(result.objects || []).length) addItem(els.objects, result.objects ? "none found" : missing(result, "objects"));
    els.objectsCount.textContent = result.objects ? "(" + result.objects.length + ")" : "";

    clear(els.featureErrorList);
    const errors = result.errors || [];
    for (const e of errors) addItem(els.featureErrorList, e.feature + ": " + e.message + " (" + e.code + ")");
    els.featureErrors.hidden = errors.length === 0;

    fillDl(
      els.timings,
      Object.entries(result.timings || {})
        .filter(([, v]) => typeof v === "number") // a backend not called has no entry (null)
        .map(([k, v]) => [k, v.toFixed(1) + " ms"]),
    );
    fillDl(els.models, Object.entries(result.models || {}).map(([k, v]) => [k, describeModel(v)]));
    els.requestId.textContent = result.request_id || "";

    els.feedbackForm.reset();
    els.feedbackCaption.value = caption ? caption.text : "";
    els.feedbackStatus.textContent = "";
    els.feedbackStatus.className = "status";
    els.feedbackSubmit.disabled = false;
    els.results.hidden = false;
  }

  // ------------------------------------------------------------------ feedback

  async function sendFeedback(event) {
    event.preventDefault();
    if (!current) return;
    // The server-made inference_id names this very analysis (a request id may have been reused).
    const body = { inference_id: current.inference_id };
    const corrected = els.feedbackCaption.value.trim();
    const original = current.caption ? current.caption.text : "";
    if (corrected && corrected !== original) body.caption = corrected;
    const rating = els.feedbackForm.querySelector('input[name="rating"]:checked');
    if (rating) body.rating = Number(rating.value);
    const reason = els.feedbackReason.value.trim();
    if (reason) body.reason = reason;
    els.feedbackStatus.className = "status";
    if (body.caption === undefined && body.rating === undefined) {
      els.feedbackStatus.textContent = "Write a corrected caption or pick a rating first.";
      return;
    }
    els.feedbackSubmit.disabled = true;
    els.feedbackStatus.textContent = "Sending…";
    try {
      await callApi("/v1/feedback", {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json", Accept: "application/json" }, authHeaders()),
        body: JSON.stringify(body),
      });
      els.feedbackStatus.textContent = "Thank you, your feedback was recorded.";
      els.feedbackStatus.className = "status ok";
    } catch (err) {
      els.feedbackStatus.textContent = describeError(err);
      els.feedbackStatus.className = "status error-inline";
      els.feedbackSubmit.disabled = false;
    }
  }

  // ------------------------------------------------------------------ wiring

  els.fileInput.addEventListener("change", () => {
    analyzeFile(els.fileInput.files && els.fileInput.files[0]);
  });

  els.urlForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const url = els.urlInput.value.trim();
    if (!/^https?:\/\//i.test(url)) {
      showError({ code: "bad_request", message: "Enter an http:// or https:// address." });
      els.urlInput.focus();
      return;
    }
    analyze({ url: url });
  });

  ["dragenter", "dragover"].forEach((type) =>
    els.dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      els.dropZone.classList.add("dragging");
    }),
  );
  ["dragleave", "drop"].forEach((type) =>
    els.dropZone.addEventListener(type, () => els.dropZone.classList.remove("dragging")),
  );
  els.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) analyzeFile(files[0]);
  });

  // A file dropped next to the drop zone would make the browser leave the page to show it.
  ["dragover", "drop"].forEach((type) =>
    document.addEventListener(type, (event) => {
      if (!els.dropZone.contains(event.target)) event.preventDefault();
    }),
  );

  document.addEventListener("paste", (event) => {
    const target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return; // typing, not an image
    const files = event.clipboardData && event.clipboardData.files;
    if (files && files.length) {
      event.preventDefault();
      analyzeFile(files[0]);
    }
  });

  els.feedbackForm.addEventListener("submit", sendFeedback);
})();
