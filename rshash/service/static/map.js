// The map of scene-tile hits: each hit's footprint over its scene's own overview image (no
// external tile server), cards and footprints highlighting each other, and a drawn box that
// becomes the search's bbox filter. Needs Leaflet, served by the app from node_modules.
(function () {
  const section = document.getElementById("geo");
  if (!window.L || !section) return;  // Leaflet not installed: the page works without the map
  const $ = (id) => document.getElementById(id);
  const map = L.map("map", {zoomSnap: 0.25, attributionControl: false}).setView([0, 0], 2);
  const scenes = L.layerGroup().addTo(map);
  const footprints = L.featureGroup().addTo(map);
  const shownScenes = new Map();  // scene name -> image overlay
  // Longitudes are drawn on one continuous line (Leaflet takes any lng): each scene near the
  // longitude of its first hit, so a footprint or scene across ±180° is not drawn the long way
  // round; boxes are [west, south, east, north] with west > east across ±180° (RFC 7946).
  const frames = new Map();  // scene name -> the longitude it is drawn near
  const near = (lon, ref) => lon - 360 * Math.round((lon - ref) / 360);
  const width = (w, e) => (e >= w ? e - w : e + 360 - w);
  const byId = new Map();  // tile id -> polygon
  let bbox = null, boxLayer = null, drawing = false, start = null, dragBox = null, fitted = false;

  const base = {color: "#ffb000", weight: 2, fillOpacity: 0.08, className: "footprint"};
  const lit = {color: "#ff2d55", weight: 4, fillOpacity: 0.3};
  const card = (id) => document.querySelector(`#results .card[data-id="${CSS.escape(id)}"]`);

  function highlight(id, on) {
    const poly = byId.get(id);
    if (poly) {
      poly.setStyle(on ? lit : base);
      poly.getElement()?.classList.toggle("hl", on);
      if (on) poly.bringToFront();
    }
    card(id)?.classList.toggle("hl", on);
  }

  async function showScene(hit) {
    if (shownScenes.has(hit.scene)) return;
    shownScenes.set(hit.scene, null);
    const res = await fetch(`/scenes/overview?item=${encodeURIComponent(hit.id)}`);
    if (!res.ok) return;
    const info = await res.json();
    const [w, s, e, n] = info.bounds_wgs84;
    const west = near(w, frames.get(hit.scene));
    const layer = L.imageOverlay(info.image, [[s, west], [n, west + width(w, e)]],
      {className: "scene-overview"});
    shownScenes.set(hit.scene, layer.addTo(scenes));
  }

  function show(results) {
    const tiles = results.filter((r) => r.footprint_wgs84);
    section.hidden = tiles.length === 0 && bbox === null;
    footprints.clearLayers();
    byId.clear();
    for (const hit of tiles) {
      if (!frames.has(hit.scene)) frames.set(hit.scene, hit.footprint_wgs84[0][0]);
      const ref = frames.get(hit.scene);
      const poly = L.polygon(hit.footprint_wgs84.map(([lon, lat]) => [lat, near(lon, ref)]), base);
      poly.bindTooltip(`${hit.id} · d = ${hit.distance}`);
      poly.on("mouseover", () => highlight(hit.id, true));
      poly.on("mouseout", () => highlight(hit.id, false));
      poly.on("click", () => card(hit.id)?.scrollIntoView({behavior: "smooth", block: "nearest"}));
      poly.addTo(footprints);
      poly.getElement()?.setAttribute("data-id", hit.id);
      byId.set(hit.id, poly);
      showScene(hit);
    }
    const groups = new Map();  // scene -> its hits' footprints, in rank order of their best hit
    for (const hit of tiles) {
      if (!groups.has(hit.scene)) groups.set(hit.scene, L.featureGroup());
      groups.get(hit.scene).addLayer(byId.get(hit.id));
    }
    const zoomTo = (group) => map.fitBounds(group.getBounds(), {padding: [30, 30], maxZoom: 19});
    $("scenes").replaceChildren(...[...groups].map(([scene, group]) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "scene";
      b.textContent = `${scene} · ${group.getLayers().length}`;
      b.title = "show this scene's hits";
      b.addEventListener("click", () => zoomTo(group));
      return b;
    }));
    map.invalidateSize();
    if (tiles.length && (!fitted || bbox === null)) {
      zoomTo(groups.values().next().value);  // the best hit's scene
      fitted = true;
    }
  }

  function setBbox(box) {
    bbox = box;
    if (boxLayer) { boxLayer.remove(); boxLayer = null; }
    if (box) {
      const [w, s, e, n] = box;
      const west = near(w, map.getCenter().lng);
      boxLayer = L.rectangle([[s, west], [n, west + width(w, e)]], {color: "#1f3b57", weight: 2,
        dashArray: "6 4", fill: false, interactive: false, className: "bbox"}).addTo(map);
      $("bbox-text").textContent = box.map((v) => v.toFixed(5)).join(", ");
    }
    $("bbox").hidden = !box;
    window.dispatchEvent(new CustomEvent("bboxchange", {detail: box}));
  }

  function boxOf(b) {  // drawn bounds, at any longitudes -> a bbox with longitudes in [-180, 180]
    const span = b.getEast() - b.getWest(), west = near(b.getWest(), 0);
    if (span >= 360) return [-180, b.getSouth(), 180, b.getNorth()];
    return [west, b.getSouth(), west + span > 180 ? west + span - 360 : west + span, b.getNorth()];
  }

  $("draw-box").addEventListener("click", () => {
    drawing = !drawing;
    $("draw-box").classList.toggle("on", drawing);
    map.getContainer().style.cursor = drawing ? "crosshair" : "";
    if (drawing) map.dragging.disable(); else map.dragging.enable();
  });
  map.on("mousedown", (e) => {
    if (!drawing) return;
    start = e.latlng;
    dragBox = L.rectangle(L.latLngBounds(start, start), {weight: 1, interactive: false}).addTo(map);
  });
  map.on("mousemove", (e) => { if (dragBox) dragBox.setBounds(L.latLngBounds(start, e.latlng)); });
  map.on("mouseup", (e) => {
    if (!dragBox) return;
    const b = L.latLngBounds(start, e.latlng);
    dragBox.remove();
    dragBox = null;
    drawing = false;
    $("draw-box").classList.remove("on");
    map.getContainer().style.cursor = "";
    map.dragging.enable();
    if (b.getNorth() === b.getSouth() || b.getEast() === b.getWest()) return;
    setBbox(boxOf(b));
  });
  $("clear-bbox").addEventListener("click", () => setBbox(null));
  $("results").addEventListener("mouseover", (e) => {
    const c = e.target.closest(".card");
    if (c) highlight(c.dataset.id, true);
  });
  $("results").addEventListener("mouseout", (e) => {
    const c = e.target.closest(".card");
    if (c && !c.contains(e.relatedTarget)) highlight(c.dataset.id, false);
  });

  window.geoMap = {show, bbox: () => bbox, map};
})();
