// Upload a panorama to POST /localize and show the matches with their aerial thumbnails.
"use strict";
(function () {
  const form = document.getElementById("upload-form");
  const fileInput = document.getElementById("image");
  const kInput = document.getElementById("k");
  const keyInput = document.getElementById("api-key");
  const statusEl = document.getElementById("status");
  const summaryEl = document.getElementById("summary");
  const resultsEl = document.getElementById("results");
  const preview = document.getElementById("preview");
  const objectUrls = [];

  keyInput.value = sessionStorage.getItem("geoloc-api-key") || "";

  function headers() {
    const key = keyInput.value.trim();
    sessionStorage.setItem("geoloc-api-key", key);
    return key ? { "X-API-Key": key } : {};
  }

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.className = isError ? "error" : "";
  }

  function releaseUrls() {
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Thumbnails are fetched (not <img src>) so that the X-API-Key header goes with them.
  async function loadThumb(img, tileId) {
    try {
      const resp = await fetch("tiles/" + encodeURIComponent(tileId), { headers: headers() });
      if (!resp.ok) throw new Error(resp.status);
      const url = URL.createObjectURL(await resp.blob());
      objectUrls.push(url);
      img.src = url;
    } catch (err) {
      img.alt = "thumbnail unavailable";
      img.classList.add("missing");
    }
  }

  function render(body) {
    resultsEl.replaceChildren();
    releaseUrls();
    const t = body.timing_ms;
    summaryEl.textContent = `${body.results.length} matches from ${body.index.count} tiles ` +
      `(model ${body.model.fingerprint}; ${t.total.toFixed(1)} ms on the server)`;
    for (const r of body.results) {
      const li = el("li", "result");
      li.dataset.tileId = r.tile_id;
      const img = el("img", "thumb");
      img.alt = "aerial tile " + r.tile_id;
      li.append(img);
      li.append(el("div", "rank", `#${r.rank} · tile ${r.tile_id}`));
      li.append(el("div", "score", `score ${r.score.toFixed(4)}`));
      const coords = el("a", "coords", `${r.lat.toFixed(6)}, ${r.lon.toFixed(6)}`);
      coords.href = `https://www.openstreetmap.org/?mlat=${r.lat}&mlon=${r.lon}#map=17/${r.lat}/${r.lon}`;
      coords.target = "_blank";
      coords.rel = "noopener";
      li.append(coords);
      resultsEl.append(li);
      loadThumb(img, r.tile_id);
    }
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (preview.src) URL.revokeObjectURL(preview.src);
    if (file) {
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) { setStatus("Choose a panorama first.", true); return; }
    const data = new FormData();
    data.append("image", file, file.name);
    const k = Math.max(1, Math.min(100, parseInt(kInput.value, 10) || 5));
    setStatus("Localizing…", false);
    try {
      const resp = await fetch(`localize?k=${k}`, { method: "POST", body: data, headers: headers() });
      const body = await resp.json();
      if (!resp.ok) {
        const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
        setStatus(`Error ${resp.status}: ${detail}`, true);
        return;
      }
      render(body);
      setStatus("Done.", false);
    } catch (err) {
      setStatus("Request failed: " + err, true);
    }
  });
})();
