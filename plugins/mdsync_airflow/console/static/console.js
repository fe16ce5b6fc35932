// The console's few actions (retry selected errors, preview and start an undo). Requests go to the console's own
// API with the page's Airflow login (its cookie); the API checks the user may trigger the DAG.
(function () {
  "use strict";
  function post(url, body, out) {
    out.textContent = "starting…";
    return fetch(url, {method: "POST", credentials: "same-origin",
                       headers: {"Content-Type": "application/json", "Accept": "application/json"},
                       body: JSON.stringify(body)})
      .then(function (r) { return r.json().then(function (j) { return {ok: r.ok, status: r.status, body: j}; }); })
      .then(function (res) {
        if (res.ok) {
          out.className = "notice ok";
          out.innerHTML = "";
          var a = document.createElement("a");
          a.href = res.body.run_url; a.textContent = res.body.run_id;
          out.append("Started run ", a, ". " + (res.body.message || ""));
        } else {
          out.className = "notice error";
          out.textContent = "Not started (" + res.status + "): " + (res.body.detail && res.body.detail.message || res.body.detail || "");
        }
      })
      .catch(function (e) { out.className = "notice error"; out.textContent = "Not started: " + e; });
  }
  document.addEventListener("click", function (ev) {
    var el = ev.target.closest("[data-action]");
    if (!el) { return; }
    ev.preventDefault();
    var out = document.getElementById(el.dataset.out || "action-result");
    if (el.dataset.action === "retry") {
      var ids = Array.prototype.map.call(document.querySelectorAll("input[name=person]:checked"),
                                         function (c) { return parseInt(c.value, 10); });
      if (!ids.length) { out.className = "notice error"; out.textContent = "Select the errors to retry first."; return; }
      post(el.dataset.url, {person_ids: ids}, out);
    } else if (el.dataset.action === "undo") {
      post(el.dataset.url, {dry_run: el.dataset.dryRun === "true"}, out);
    }
  });
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll("input[name=person]").forEach(function (c) { c.checked = all.checked; });
    });
  }
})();
