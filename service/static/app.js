// Upload a panorama or photo to POST /localize; show the matches on a map drawn from their own aerial
// thumbnails (GET /tiles/{id}; no tile server, so it works offline) and as a list, with the view's
// heading as arrows and a warning when the best match barely beats a place elsewhere.
"use strict";
(function () {
  const form = document.getElementById("upload-form");
  const fileInput = document.getElementById("image");
  const kInput = document.getElementById("k");
  const keyInput = document.getElementById("api-key");
  const authDetails = document.getElementById("auth");
  const fovInput = document.getElementById("fov");
  const headingInput = document.getElementById("heading");
  const headingWithinInput = document.getElementById("heading-within");
  const projectionInput = document.getElementById("projection");
  const fovPrompt = document.getElementById("fov-prompt");
  const statusEl = document.getElementById("status");
  const summaryEl = document.getElementById("summary");
  const viewEl = document.getElementById("view");
  const confidenceEl = document.getElementById("confidence");
  const resultsEl = document.getElementById("results");
  const preview = document.getElementById("preview");
  const mapFigure = document.getElementById("map-figure");
  const mapEl = document.getElementById("map");
  const mapCaption = document.getElementById("map-caption");
  const objectUrls = [];
  let renderCount = 0;  // thumbnails arriving after a newer answer was drawn are dropped

  const SVG_NS = "http://www.w3.org/2000/svg";
  const EARTH_RADIUS_M = 6371008.8;  // mean radius (IUGG)
  const MAP_W = 640;                 // SVG user units; the element scales to the page width
  const MAP_H = 400;
  const MAP_MARGIN = 56;             // keeps thumbnails and markers at the edges inside the map
  const MIN_SPAN_M = 200;            // one match, or matches on one spot, still get a street-scale map
  const PIN_R = 11;
  const BEST_PIN_R = 14;
  const MAX_DISTANCE_LABELS = 9;     // #2..#10; beyond that labels would pile up (the list has them all)
  const BEST_ARROW_LENGTH = 46;      // from the tile centre; the pin covers its first BEST_PIN_R
  const ARROW_LENGTH = 28;
  const WEDGE_RADIUS = 74;

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

  function svg(tag, attrs, parent, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.append(node);
    return node;
  }

  // Thumbnails are fetched (not <img src>) so that the X-API-Key header goes with them.
  // Resolves to an object URL, or null when the tile image is unavailable.
  async function fetchThumb(tileId, forRender) {
    try {
      const resp = await fetch("tiles/" + encodeURIComponent(tileId), { headers: headers() });
      if (!resp.ok) throw new Error(resp.status);
      const url = URL.createObjectURL(await resp.blob());
      if (forRender !== renderCount) { URL.revokeObjectURL(url); return null; }
      objectUrls.push(url);
      return url;
    } catch (err) {
      return null;
    }
  }

  // --- geometry ---------------------------------------------------------------------------------

  function toRad(deg) { return deg * Math.PI / 180; }

  function haversineM(a, b) {
    const dLat = toRad(b.lat - a.lat);
    const dLon = toRad(b.lon - a.lon);
    const h = Math.sin(dLat / 2) ** 2 +
      Math.cos(toRad(a.lat)) * Math.cos(toRad(b.lat)) * Math.sin(dLon / 2) ** 2;
    return 2 * EARTH_RADIUS_M * Math.asin(Math.min(1, Math.sqrt(h)));
  }

  function formatDistance(m) {
    if (m < 1000) return `${Math.round(m)} m`;
    return `${(m / 1000).toFixed(m < 10000 ? 2 : m < 100000 ? 1 : 0)} km`;
  }

  function formatCoords(r) { return `${r.lat.toFixed(6)}, ${r.lon.toFixed(6)}`; }

  function formatDegrees(deg) { return `${Number(deg.toFixed(1))}°`; }

  // Two significant digits: 0.01234 -> "0.012", 0.08 -> "0.08"
  function formatMargin(margin) { return String(Number(margin.toPrecision(2))); }

  // Local equirectangular projection to metres east and north (layout() centres them), scaled at the
  // matches' mean latitude: over the few kilometres a top-k spans, far below a pixel of distortion.
  function projector(results) {
    const lat0 = results.reduce((sum, r) => sum + r.lat, 0) / results.length;
    const lon0 = results[0].lon;
    const eastScale = Math.cos(toRad(lat0));
    return (r) => {
      const dLon = ((r.lon - lon0 + 540) % 360) - 180;  // matches across the antimeridian stay together
      return { x: EARTH_RADIUS_M * toRad(dLon) * eastScale, y: EARTH_RADIUS_M * toRad(r.lat - lat0) };
    };
  }

  // Map positions (SVG units, north up) of the matches, and the scale.
  function layout(results) {
    const project = projector(results);
    const ground = results.map(project);
    const xs = ground.map((p) => p.x);
    const ys = ground.map((p) => p.y);
    const [minX, maxX, minY, maxY] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const innerW = MAP_W - 2 * MAP_MARGIN;
    const innerH = MAP_H - 2 * MAP_MARGIN;
    const metresPerUnit = Math.max((maxX - minX) / innerW, (maxY - minY) / innerH, MIN_SPAN_M / innerW);
    const midX = (minX + maxX) / 2;
    const midY = (minY + maxY) / 2;
    const toMap = (p) => ({ x: MAP_W / 2 + (p.x - midX) / metresPerUnit, y: MAP_H / 2 - (p.y - midY) / metresPerUnit });
    return { points: ground.map(toMap), metresPerUnit, place: (r) => toMap(project(r)) };
  }

  // The refined position (POST /localize's `position`): a cross, and a circle of its uncertainty radius.
  function drawPosition(position, place, metresPerUnit) {
    if (!position) return;
    const at = place(position);
    const group = svg("g", { class: "position" }, mapEl);
    svg("circle", { class: "uncertainty", cx: at.x, cy: at.y, r: Math.max(4, position.uncertainty_m / metresPerUnit) },
      group);
    svg("path", { class: "position-mark", d: `M${at.x - 7},${at.y}h14M${at.x},${at.y - 7}v14` }, group);
    svg("title", {}, group, `refined position ${formatCoords(position)} ± ${formatDistance(position.uncertainty_m)}`);
  }

  // Neighbouring tiles would put their numbered pins on top of each other: push overlapping pins
  // apart (a leader line then joins a moved pin to its tile centre). #1 stays where it is.
  function spreadPins(anchors, radii) {
    const pins = anchors.map((p) => ({ x: p.x, y: p.y }));
    for (let pass = 0; pass < 60; pass++) {
      let moved = false;
      for (let i = 0; i < pins.length; i++) {
        for (let j = i + 1; j < pins.length; j++) {
          const gap = radii[i] + radii[j] + 2;
          let dx = pins[j].x - pins[i].x;
          let dy = pins[j].y - pins[i].y;
          let dist = Math.hypot(dx, dy);
          if (dist >= gap) continue;
          if (dist < 1e-6) {  // the same spot: part them in a direction that differs per pin
            dx = Math.cos(j * 2.39996);
            dy = Math.sin(j * 2.39996);
            dist = 1;
          }
          const shareI = i === 0 ? 0 : 0.5;
          const step = (gap - dist) / dist;
          pins[i].x -= dx * step * shareI;
          pins[i].y -= dy * step * shareI;
          pins[j].x += dx * step * (1 - shareI);
          pins[j].y += dy * step * (1 - shareI);
          moved = true;
        }
      }
      pins.forEach((p, i) => {
        p.x = Math.min(MAP_W - radii[i] - 2, Math.max(radii[i] + 2, p.x));
        p.y = Math.min(MAP_H - radii[i] - 2, Math.max(radii[i] + 2, p.y));
      });
      if (!moved) break;
    }
    return pins;
  }

  function overlaps(a, b) { return a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1; }

  // A distance label goes on its line: at the middle or the nearest spot along it that covers no
  // pin and no earlier label, else beside the far pin (a short line between neighbouring tiles is
  // all pin). Returns null where no spot is free: the list below the map has every distance.
  function placeLabel(from, to, farPin, farRadius, text, taken) {
    const halfW = 3.5 * text.length + 3;
    const halfH = 8;
    const spots = [0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2].map((t) => ({
      x: from.x + (to.x - from.x) * t, y: from.y + (to.y - from.y) * t }));
    const reach = farRadius + 3;
    spots.push({ x: farPin.x + reach + halfW, y: farPin.y }, { x: farPin.x - reach - halfW, y: farPin.y },
      { x: farPin.x, y: farPin.y - reach - halfH }, { x: farPin.x, y: farPin.y + reach + halfH });
    for (const { x, y } of spots) {
      const box = { x, y, x0: x - halfW, x1: x + halfW, y0: y - halfH, y1: y + halfH };
      const inside = box.x0 >= 0 && box.x1 <= MAP_W && box.y0 >= 0 && box.y1 <= MAP_H;
      if (inside && !taken.some((other) => overlaps(other, box))) {
        taken.push(box);
        return box;
      }
    }
    return null;
  }

  // The largest 1, 2 or 5 x 10^n metres not longer than `metres`.
  function roundLength(metres) {
    const power = 10 ** Math.floor(Math.log10(metres));
    return [5, 2, 1].map((f) => f * power).find((v) => v <= metres);
  }

  // --- the map ----------------------------------------------------------------------------------

  function drawScaleBar(metresPerUnit) {
    const metres = roundLength(130 * metresPerUnit);
    const length = metres / metresPerUnit;
    const x = 16;
    const y = MAP_H - 16;
    const g = svg("g", { class: "scale-bar" }, mapEl);
    const d = `M${x} ${y - 6}V${y}H${x + length}V${y - 6}`;
    svg("path", { d, class: "halo" }, g);
    svg("path", { d }, g);
    const label = metres < 1000 ? `${metres} m` : `${metres / 1000} km`;
    svg("text", { x: x + length / 2, y: y - 10 }, g, label);
  }

  function drawNorthArrow() {
    const g = svg("g", { class: "north-arrow", transform: `translate(${MAP_W - 24} 12)` }, mapEl);
    svg("title", {}, g, "north is up");
    svg("path", { d: "M0 0L8 22L0 17L-8 22Z" }, g);
    svg("text", { x: 0, y: 36 }, g, "N");
  }

  // The tiles' own thumbnails are the map imagery; worst first so that better matches lie on top.
  // `competitor`: the index of the look-alike place of an ambiguous answer (-1: none shown).
  function drawTiles(points, thumbs, competitor) {
    const side = points.length <= 10 ? 72 : 44;
    const tiles = svg("g", { class: "tiles", "aria-hidden": "true" }, mapEl);
    for (let i = points.length - 1; i >= 0; i--) {
      const box = { x: points[i].x - side / 2, y: points[i].y - side / 2, width: side, height: side };
      svg("rect", { ...box, class: "tile-backing" }, tiles);
      const image = svg("image", { ...box, preserveAspectRatio: "xMidYMid slice", class: "tile" }, tiles);
      thumbs[i].then((url) => { if (url) image.setAttribute("href", url); });
      const frame = i === 0 ? "tile-frame best" : i === competitor ? "tile-frame competitor" : "tile-frame";
      svg("rect", { ...box, class: frame }, tiles);
    }
  }

  function drawDistanceLines(points) {
    const lines = svg("g", { class: "distances" }, mapEl);
    for (let i = 1; i < points.length; i++) {
      svg("line", { x1: points[0].x, y1: points[0].y, x2: points[i].x, y2: points[i].y }, lines);
    }
  }

  // `arrowBoxes`: what the heading arrows cover, kept free like the pins.
  function drawDistanceLabels(results, points, pins, radii, distances, arrowBoxes) {
    const taken = pins.map((p, i) => ({
      x0: p.x - radii[i], x1: p.x + radii[i], y0: p.y - radii[i], y1: p.y + radii[i] }));
    // ...and the corners the scale bar (bottom left) and the north arrow (top right) take
    taken.push({ x0: 0, x1: 160, y0: MAP_H - 36, y1: MAP_H }, { x0: MAP_W - 44, x1: MAP_W, y0: 0, y1: 56 });
    taken.push(...arrowBoxes);
    const labels = svg("g", { class: "distance-labels" }, mapEl);
    for (let i = 1; i < Math.min(results.length, MAX_DISTANCE_LABELS + 1); i++) {
      const text = formatDistance(distances[i]);
      const spot = placeLabel(points[0], points[i], pins[i], radii[i], text, taken);
      if (!spot) continue;
      svg("text", {
        class: "distance", x: spot.x, y: spot.y, "data-from": results[0].rank, "data-to": results[i].rank,
      }, labels, text);
    }
  }

  // The heading to draw at match i: its own (the model's estimate at that tile); at #1 otherwise the
  // view's (given as a parameter or by EXIF, it holds wherever the image was taken). null: none.
  function headingAt(results, view, i) {
    return results[i].heading_deg ?? (i === 0 ? view.heading_deg ?? null : null);
  }

  // A sector of `fovDeg` centred on north (up) at the origin.
  function wedgePath(fovDeg, radius) {
    const half = toRad(fovDeg / 2);
    const x = radius * Math.sin(half);
    const y = -radius * Math.cos(half);
    const [left, right, top] = [(-x).toFixed(2), x.toFixed(2), y.toFixed(2)];
    return `M0 0L${left} ${top}A${radius} ${radius} 0 ${fovDeg > 180 ? 1 : 0} 1 ${right} ${top}Z`;
  }

  // An arrow from each tile centre in the view's heading: drawn pointing north, then rotated (on a
  // y-down map SVG's rotate() turns clockwise, as headings do). At #1 a wedge spans the field of view.
  // Drawn under the pins, so an arrow seems to leave its pin. Returns the boxes of small squares
  // along each arrow (a diagonal arrow's own bounding box would cover much more than the arrow).
  function drawHeadings(results, points, view) {
    const layer = svg("g", { class: "headings", "aria-hidden": "true" }, mapEl);
    const boxes = [];
    results.forEach((r, i) => {
      const heading = headingAt(results, view, i);
      if (heading === null) return;
      const best = i === 0;
      const length = best ? BEST_ARROW_LENGTH : ARROW_LENGTH;
      const [headLength, headHalf, shaftHalf] = best ? [14, 8, 2] : [10, 5.5, 1.5];
      const g = svg("g", {
        class: best ? "heading best" : "heading", "data-rank": r.rank, "data-heading-deg": heading,
        transform: `translate(${points[i].x.toFixed(2)} ${points[i].y.toFixed(2)}) rotate(${heading})`,
      }, layer);
      if (best && view.fov_deg < 360) {
        svg("path", { class: "fov-wedge", d: wedgePath(view.fov_deg, WEDGE_RADIUS) }, g);
      }
      const neck = headLength - length;
      svg("path", { class: "arrow-shaft", d: `M${-shaftHalf} 0V${neck}H${shaftHalf}V0Z` }, g);
      svg("path", { class: "arrow-head", d: `M0 ${-length}L${headHalf} ${neck}H${-headHalf}Z` }, g);
      const [stepX, stepY] = [Math.sin(toRad(heading)), -Math.cos(toRad(heading))];  // one unit along it
      for (let along = length; along > 0; along -= headHalf) {
        const [x, y] = [points[i].x + stepX * along, points[i].y + stepY * along];
        boxes.push({ x0: x - headHalf, x1: x + headHalf, y0: y - headHalf, y1: y + headHalf });
      }
    });
    return boxes;
  }

  // A dot on each tile centre (joined to its pin when the pin had to move), then the numbered pins,
  // each a link to its entry in the list.
  function drawMarkers(results, points, pins, radii, distances, view, competitor) {
    const anchors = svg("g", { class: "anchors", "aria-hidden": "true" }, mapEl);
    results.forEach((r, i) => {
      const [p, pin] = [points[i], pins[i]];
      if (Math.hypot(pin.x - p.x, pin.y - p.y) > 0.5) {
        svg("line", { class: "leader", x1: p.x, y1: p.y, x2: pin.x, y2: pin.y }, anchors);
      }
      svg("circle", { class: "anchor", cx: p.x, cy: p.y, r: 2.5, "data-rank": r.rank }, anchors);
    });
    const markers = svg("g", { class: "markers" }, mapEl);
    results.forEach((r, i) => {
      let away = i === 0 ? "best match" : `${formatDistance(distances[i])} from #1`;
      if (i === competitor) away += ", the look-alike place";
      const heading = headingAt(results, view, i);
      const looks = heading === null ? "" : `, heading ${formatDegrees(heading)}`;
      const marker = svg("a", {
        href: `#match-${r.rank}`, class: i === 0 ? "marker best" : i === competitor ? "marker competitor" : "marker",
        "data-rank": r.rank, "data-tile-id": r.tile_id,
        "aria-label": `#${r.rank}: tile ${r.tile_id} at ${formatCoords(r)}, ${away}${looks}`,
      }, markers);
      svg("title", {}, marker, `#${r.rank} · tile ${r.tile_id} · ${formatCoords(r)} · ${away}${looks}`);
      svg("circle", { class: "pin", cx: pins[i].x, cy: pins[i].y, r: radii[i] }, marker);
      svg("text", { class: "pin-number", x: pins[i].x, y: pins[i].y }, marker, String(r.rank));
    });
  }

  function drawMap(results, thumbs, distances, view, competitor, position) {
    mapEl.replaceChildren();
    mapEl.setAttribute("viewBox", `0 0 ${MAP_W} ${MAP_H}`);
    if (!results.length) { mapFigure.hidden = true; return; }
    const { points, metresPerUnit, place } = layout(results);
    const radii = results.map((_, i) => (i === 0 ? BEST_PIN_R : PIN_R));
    const pins = spreadPins(points, radii);
    svg("rect", { class: "ground", width: MAP_W, height: MAP_H }, mapEl);
    drawTiles(points, thumbs, competitor);
    drawDistanceLines(points);
    const arrowBoxes = drawHeadings(results, points, view);
    drawDistanceLabels(results, points, pins, radii, distances, arrowBoxes);
    drawMarkers(results, points, pins, radii, distances, view, competitor);
    drawPosition(position, place, metresPerUnit);
    drawScaleBar(metresPerUnit);
    drawNorthArrow();
    const tileNote = "each aerial tile is drawn at its centre (not to its ground size)";
    let caption = results.length === 1 ? `The best match, north up: ${tileNote}.` :
      `The ${results.length} best matches, north up: ${tileNote}, the numbers are the ranks, the lines ` +
      `join #1 to the others with their distance; all lie within ${formatDistance(Math.max(...distances))} of #1.`;
    const arrows = mapEl.querySelectorAll(".heading").length;
    if (arrows) {
      caption += (arrows === 1 ? " The arrow at #1 points" : " The arrows point") +
        " where the image looks, were it taken there" +
        (view.fov_deg < 360 ? "; the wedge spans its field of view." : ".");
    }
    if (competitor > 0) caption += " The dashed red frame marks the look-alike place.";
    if (position) {
      caption += ` The red cross is the refined position (${formatCoords(position)}), the circle its uncertainty ` +
        `(± ${formatDistance(position.uncertainty_m)}).`;
    }
    mapCaption.textContent = caption;
    mapFigure.hidden = false;
  }

  // --- the answer -------------------------------------------------------------------------------

  const SOURCE_WORDS = {
    parameter: "as entered", exif: "from EXIF", xmp: "from the panorama's XMP", aspect: "from the image's shape",
    estimated: "estimated at #1",
  };

  function viewPart(className, text, source) {
    const part = el("span", className, text);
    if (source) {
      part.dataset.source = source;
      part.append(el("span", "source", ` (${SOURCE_WORDS[source]})`));
    }
    return part;
  }

  // How the server read the image: projection, field of view, heading, and where each came from.
  function describeView(view, sentProjection, results) {
    const kind = view.projection === "perspective" ? "a photo (perspective)" :
      view.fov_deg >= 360 ? "a 360° panorama (equirectangular)" : "part of a panorama (equirectangular)";
    const heading = view.heading_deg === null ?
      el("span", "view-heading", "heading unknown (this service does not estimate it; enter it if you know it)") :
      viewPart("view-heading", `heading ${formatDegrees(view.heading_deg)}` + (view.heading_within_deg == null ?
        "" : ` ±${formatDegrees(view.heading_within_deg)}`), view.heading_source);
    viewEl.replaceChildren("Read as ", viewPart("view-projection", kind, sentProjection ? "parameter" : null),
      " · ", viewPart("view-fov", `field of view ${formatDegrees(view.fov_deg)}`, view.fov_source), " · ", heading);
    // A given heading places the view; the orientation head may still turn it at #1 (the arrow shows that).
    const atBest = results.length ? results[0].heading_deg : null;
    if (view.heading_source !== "estimated" && view.heading_deg !== null && atBest !== null &&
        formatDegrees(atBest) !== formatDegrees(view.heading_deg)) {
      viewEl.append(" · ", el("span", "view-heading-at-best", `the model finds ${formatDegrees(atBest)} at #1`));
    }
  }

  // A warning when the best match barely beats a place elsewhere, else a note of the margin.
  function describeConfidence(confidence, results, distances, competitor) {
    const apart = `${Math.round(confidence.distinct_m)} m or more away`;
    const margin = confidence.margin;
    let text;
    if (margin === null) {
      text = `No margin to judge the best match by: none of the candidates lies ${apart} from it.`;
    } else {
      const tile = `tile ${confidence.competitor_tile_id}`;
      const where = competitor > 0 ?
        `${tile}, #${results[competitor].rank}, ${formatDistance(distances[competitor])} from #1` :
        `${tile}, not among the ${results.length} shown: ask for more matches to see it`;
      text = confidence.ambiguous ?
        `Ambiguous: the best match beats a place ${apart} (${where}) by only ${formatMargin(margin)}; ` +
        "the true place may be either." :
        `Clear margin ${formatMargin(margin)} over the best place ${apart} (${where}).`;
    }
    confidenceEl.textContent = text;
    confidenceEl.className = confidence.ambiguous ? "warning" : "note";
    confidenceEl.hidden = false;
  }

  function clearAnswer() {
    renderCount += 1;  // thumbnails still on their way are dropped
    releaseUrls();
    for (const node of [summaryEl, viewEl, confidenceEl, resultsEl, mapEl, mapCaption]) node.replaceChildren();
    confidenceEl.hidden = true;
    mapFigure.hidden = true;
  }

  function render(body, sentProjection) {
    clearAnswer();
    const thisRender = renderCount;
    const { results, view, confidence } = body;
    const t = body.timing_ms;
    summaryEl.textContent = `${results.length} matches from ${body.index.count} tiles ` +
      `(model ${body.model.fingerprint}; ${t.total.toFixed(1)} ms on the server)`;
    const thumbs = results.map((r) => fetchThumb(r.tile_id, thisRender));
    const distances = results.map((r) => haversineM(results[0], r));
    const competitorShown = results.findIndex((r) => r.tile_id === confidence.competitor_tile_id);
    // only an ambiguous answer's competitor is pointed out on the map and in the list
    const competitor = confidence.ambiguous ? competitorShown : -1;
    describeView(view, sentProjection, results);
    describeConfidence(confidence, results, distances, competitorShown);
    drawMap(results, thumbs, distances, view, competitor, body.position);
    results.forEach((r, i) => {
      const li = el("li", i === competitor ? "result competitor" : "result");
      li.id = `match-${r.rank}`;
      li.dataset.tileId = r.tile_id;
      const img = el("img", "thumb");
      img.alt = "aerial tile " + r.tile_id;
      li.append(img);
      li.append(el("div", "rank", `#${r.rank} · tile ${r.tile_id}`));
      li.append(el("div", "score", `score ${r.score.toFixed(4)}`));
      if (i > 0) li.append(el("div", "from-best", `${formatDistance(distances[i])} from #1`));
      if (i === competitor) li.append(el("div", "look-alike", "the look-alike place: see the warning above"));
      const heading = headingAt(results, view, i);
      if (heading !== null) {
        const line = el("div", "heading", `heading ${formatDegrees(heading)}`);
        line.title = "where the image looks, were it taken here: degrees clockwise from north";
        li.append(line);
      }
      const coords = el("a", "coords");
      coords.append(el("span", "latlon", formatCoords(r)), el("span", "opens", "open in OpenStreetMap ↗"));
      coords.href = `https://www.openstreetmap.org/?mlat=${r.lat.toFixed(6)}&mlon=${r.lon.toFixed(6)}` +
        `#map=17/${r.lat.toFixed(6)}/${r.lon.toFixed(6)}`;
      coords.title = "Opens this point on openstreetmap.org in a new tab";
      coords.target = "_blank";
      coords.rel = "noopener";
      li.append(coords);
      resultsEl.append(li);
      thumbs[i].then((url) => {
        if (url) { img.src = url; return; }
        img.alt = "thumbnail unavailable";
        img.classList.add("missing");
      });
    });
  }

  // --- the request ------------------------------------------------------------------------------

  function showFovPrompt() {
    fovPrompt.textContent = "This image does not say its field of view: enter it here (a phone's main " +
      "camera: about 65 degrees; a 360° panorama: 360), then press Localize again.";
    fovPrompt.hidden = false;
    fovInput.setAttribute("aria-invalid", "true");
    fovInput.focus();
  }

  function hideFovPrompt() {
    fovPrompt.hidden = true;
    fovPrompt.textContent = "";
    fovInput.removeAttribute("aria-invalid");
  }

  // k and what the form says about the view; an empty input leaves that to the server (EXIF, shape).
  function localizeQuery() {
    const query = new URLSearchParams({ k: String(Math.max(1, Math.min(100, parseInt(kInput.value, 10) || 5))) });
    if (fovInput.value !== "") query.set("fov_deg", String(fovInput.valueAsNumber));
    if (headingInput.value !== "") query.set("heading_deg", String(headingInput.valueAsNumber % 360));
    if (headingWithinInput.value !== "") query.set("heading_within_deg", String(headingWithinInput.valueAsNumber));
    if (projectionInput.value) query.set("projection", projectionInput.value);
    return query;
  }

  // The request whose answer the page waits for; an earlier one still running is cancelled (its
  // answer would be for another image or other settings).
  let pending = null;

  function cancelPending() {
    if (pending) pending.abort();
    pending = null;
  }

  // "Error 422: k: ..." from an error answer: the field a validation error names, the request id.
  function errorText(resp, body) {
    if (!body || body.detail === undefined) return `Error ${resp.status}: ${resp.statusText || "no details"}`;
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => (Array.isArray(d.loc) ? `${d.loc[d.loc.length - 1]}: ` : "") + d.msg).join("; ")
      : body.detail;
    return `Error ${resp.status}: ${detail}` + (body.request_id ? ` (request id ${body.request_id})` : "");
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (preview.src) URL.revokeObjectURL(preview.src);
    cancelPending();
    setStatus("", false);
    hideFovPrompt();
    clearAnswer();  // it was the previous image's
    if (file) {
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
    }
  });

  fovInput.addEventListener("input", hideFovPrompt);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) { setStatus("Choose an image first.", true); return; }
    const data = new FormData();
    data.append("image", file, file.name);
    const query = localizeQuery();
    hideFovPrompt();
    clearAnswer();  // an answer on screen is the one to these settings, or none
    cancelPending();
    const request = new AbortController();
    pending = request;
    setStatus("Localizing…", false);
    try {
      const resp = await fetch(`localize?${query}`,
        { method: "POST", body: data, headers: headers(), signal: request.signal });
      const body = await resp.json().catch(() => null);  // a proxy's HTML error page is not JSON
      if (pending !== request) return;
      pending = null;
      if (resp.status === 422 && body && body.code === "fov_unknown") {
        showFovPrompt();
        setStatus("The field of view is needed: see the form.", false);
        return;
      }
      if (!resp.ok || !body) {
        setStatus(errorText(resp, body), true);
        if (resp.status === 401) {
          authDetails.open = true;
          keyInput.focus();
        }
        return;
      }
      render(body, query.has("projection"));
      setStatus("Done.", false);
    } catch (err) {
      if (pending !== request) return;  // cancelled: a newer request or another image took its place
      pending = null;
      setStatus("Request failed: " + err, true);
    }
  });
})();
