// Keyboard vetting and the "new alerts" poll for the Vigil eyeball queue. No libraries.
(function () {
  "use strict";
  var body = document.body;
  var page = body.dataset.page;
  var csrf = body.dataset.csrf;
  var KEYS = { r: "real", b: "bogus", g: "galactic", x: "extragalactic", f: "follow_up", n: "no_follow_up", s: "snooze" };
  var LABEL = { real: "real", bogus: "bogus", galactic: "galactic", extragalactic: "extragal.",
                follow_up: "follow-up", no_follow_up: "no f-up", snooze: "snoozed" };
  // Calls that answer one question replace each other's label (a later "bogus" replaces "real").
  var GROUP = { real: "real", bogus: "real", galactic: "xgal", extragalactic: "xgal",
                follow_up: "fup", no_follow_up: "fup", snooze: "snooze" };

  function showLabel(cell, action, text) {
    var old = cell.querySelector('span.lab[data-group="' + GROUP[action] + '"]');
    var span = document.createElement("span");
    span.className = "lab" + (action === "real" || action === "follow_up" ? " yes" : action === "bogus" ? " no" : "");
    span.dataset.group = GROUP[action];
    span.textContent = text;
    if (old) cell.replaceChild(span, old); else cell.appendChild(span);
  }

  // A call that was not saved stays on screen until clicked (or the next message): a vetter
  // pressing j at once must still see it.
  function toast(msg, err) {
    var t = document.getElementById("toast");
    if (!t) return;
    t.textContent = msg;
    t.className = "show" + (err ? " err" : "");
    clearTimeout(toast.timer);
    if (err) { t.title = "click to dismiss"; t.onclick = function () { t.className = ""; }; }
    else toast.timer = setTimeout(function () { t.className = ""; }, 1600);
  }

  // The server's JSON answer, or an error a vetter can act on (a login page instead of JSON
  // means the session changed or ran out).
  function answer(r) {
    if ((r.headers.get("Content-Type") || "").indexOf("application/json") < 0) {
      throw new Error(r.status === 401 || r.status === 403 || r.redirected
                      ? "your session changed or expired: reload the page" : r.status + " " + r.statusText);
    }
    return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.statusText); return j; });
  }

  // Where the cursor goes when the list page ``list`` (path and query) is shown next: on object
  // ``id``, else on row ``row`` (a number, or "last"). Only that list page uses it.
  function here(url) {  // one spelling per list page, whatever the order of its query
    var u = new URL(url || location.href, location.href);
    u.searchParams.sort();
    return u.pathname + "?" + u.searchParams.toString();
  }
  function remember(list, id, row) {
    try { sessionStorage.setItem("vigil-cursor", JSON.stringify({ list: here(list), id: id, row: row })); }
    catch (e) { /* storage off (private mode): the cursor starts at the top */ }
  }
  function recalled() {
    try {
      var v = JSON.parse(sessionStorage.getItem("vigil-cursor") || "null");
      sessionStorage.removeItem("vigil-cursor");
      return v;
    } catch (e) { return null; }
  }

  // A page's calls go one at a time, in key order: sent at once, "r" then "b" could be stored
  // bogus-then-real while the store was busy, and the object keep the call its vetter replaced.
  var chain = Promise.resolve(), failed = 0;
  function decide(objectId, alertId, action) {
    last = null;  // z acts on this call once it is saved, never on the one before it
    pending++;
    var call = chain.then(function () {
      return fetch("/api/decision", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, "Accept": "application/json" },
        body: JSON.stringify({ object_id: objectId, alert_id: alertId, action: action })
      });
    }).then(answer).then(function (j) {
      pending--;
      last = j.decision_id;
      lastObject = objectId;
      toast(objectId + ": " + action.replace(/_/g, " ") + " (z: undo)");
      return j;
    }, function (e) { pending--; failed++; toast("not saved: " + e.message, true); throw e; });
    chain = call.then(null, function () {});  // the next call waits for this one, saved or not
    return call;
  }
  // Leave the page only once its calls are saved; if one was not, stay, so its message is seen
  // (a call refused as "busy" after the page had gone was lost without a word).
  function go(leave) {
    if (!pending) { leave(); return; }
    var before = failed;
    toast("saving…");
    chain.then(function () { if (failed === before) leave(); });
  }

  // z withdraws this page's last call (kept in the store's log, marked); the page then reloads
  // to show the object's vetting state as the remaining decisions leave it.
  var last = null, lastObject = null, pending = 0;
  function withdraw(id, objectId) {
    return fetch("/api/decision/" + id + "/withdraw", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, "Accept": "application/json" },
      body: "{}"
    }).then(answer).then(function () {
      if (objectId && page === "list") remember(null, objectId, cur);  // the reloaded list: on the row undone
      location.reload();
    }, function (e) { toast("not withdrawn: " + e.message, true); throw e; });
  }
  function undo() {
    if (pending) { toast("a call is still being saved: press z again once it is", true); return; }
    if (last === null) { toast("nothing to undo on this page"); return; }
    var id = last;
    last = null;
    withdraw(id, lastObject).then(null, function () { if (last === null) last = id; });
  }

  function typing(ev) {
    var t = ev.target;
    return t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA" || t.isContentEditable);
  }

  if (page === "list") {
    var rows = Array.prototype.slice.call(document.querySelectorAll("#queue tbody tr[data-object-id]"));
    var cur = rows.length ? 0 : -1;
    var want = recalled();
    if (want && want.list === here() && rows.length) {
      var found = -1;
      rows.forEach(function (r, i) { if (want.id && r.dataset.objectId === want.id) found = i; });
      // An object that left the list (snoozed, vetted under "hide vetted"): the row now in its place.
      if (found < 0 && want.row === "last") found = rows.length - 1;
      else if (found < 0 && typeof want.row === "number") found = Math.min(want.row, rows.length - 1);
      if (found >= 0) cur = found;
    }
    function show() {
      rows.forEach(function (r, i) { r.classList.toggle("cursor", i === cur); });
      if (cur >= 0) rows[cur].scrollIntoView({ block: "nearest" });
    }
    rows.forEach(function (r, i) {
      r.addEventListener("click", function (ev) {
        if (ev.target.tagName !== "A") { cur = i; show(); }
        else if (ev.button === 0 && !(ev.ctrlKey || ev.metaKey || ev.shiftKey)) remember(null, r.dataset.objectId, i);
      });
      // Tabbing into a row makes it the row the keys act on.
      r.addEventListener("focusin", function () { cur = i; show(); });
    });
    show();
    // Decided rows that leave this view (hidden once vetted, or snoozed): the next page then starts
    // earlier than its number says, so "next" reloads this page instead of skipping objects.
    var gone = 0;
    var query = new URLSearchParams(location.search);  // as the server reads it
    var hideVetted = query.get("hide_vetted") === "1", showSnoozed = query.get("show_snoozed") === "1";
    document.addEventListener("keydown", function (ev) {
      if (typing(ev) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
      var k = ev.key;
      var t = ev.target;
      if (k === "Enter" && t && (t.tagName === "A" || t.tagName === "BUTTON")) return;  // the focused control's own
      if (k === "j") {
        if (cur < rows.length - 1) { cur++; show(); }
        else if (gone) { go(function () { location.reload(); }); }
        else { var n = document.getElementById("next-page"); if (n) go(function () { location = n.href; }); }
      } else if (k === "k") {
        if (cur > 0) { cur--; show(); }
        else {
          var p = document.getElementById("prev-page");
          if (p) go(function () { remember(p.href, null, "last"); location = p.href; });
        }
      } else if (k === "z") {
        undo();
      } else if ((k === "o" || k === "Enter") && cur >= 0) {
        var opened = rows[cur], at = cur;
        go(function () { remember(null, opened.dataset.objectId, at); location = opened.dataset.href; });
      } else if (KEYS[k] && cur >= 0) {
        var row = rows[cur], action = KEYS[k];
        decide(row.dataset.objectId, row.dataset.alertId, action).then(function () {
          showLabel(row.querySelector("td.vet"), action, LABEL[action]);
          if (action === "snooze") row.classList.add("snoozed");
          // Left the view: a call (it sets "vetted") under "hide vetted", a snooze unless snoozed ones show.
          var leaves = action === "snooze" ? !showSnoozed : hideVetted;
          if (leaves && !row.dataset.gone) { row.dataset.gone = "1"; gone++; }
        }, function () {});
      } else { return; }
      ev.preventDefault();
    });
    // Poll for objects written by `vigil run` since this page was rendered.
    var since = body.dataset.loadedMs;
    setInterval(function () {
      fetch("/api/changes?since=" + since, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (j) {
          if (!j || !j.changed) return;
          document.getElementById("nchanged").textContent = j.changed;
          document.getElementById("banner").hidden = false;
        }, function () {});
    }, 10000);
  }

  if (page === "object") {
    var oid = body.dataset.objectId, aid = body.dataset.alertId;
    // Back to the list at this object (or, if it left the list, at the row it was opened from).
    var came = recalled();
    function back() {
      remember(body.dataset.list, oid, came && came.id === oid && here(body.dataset.list) === came.list ? came.row : null);
    }
    var up = document.getElementById("up-list");
    if (up) up.addEventListener("click", back);
    document.querySelectorAll(".vetbar form").forEach(function (f) {
      f.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var btn = f.querySelector("button");
        act(btn.dataset.action);
      });
    });
    function act(action) {
      decide(oid, aid, action).then(function (j) {
        var btn = document.querySelector('.vetbar button[data-action="' + action + '"]');
        if (btn) btn.classList.add("done");
        var current = document.querySelector(".vetbar .current");
        if (action === "snooze") { var sz = document.getElementById("snoozed"); if (sz) sz.hidden = false; }
        if (current && action !== "snooze") {
          showLabel(current, action, action.replace(/_/g, " ").replace("no follow up", "no follow-up")
                    .replace("follow up", "follow-up"));
        }
        var ul = document.getElementById("decisions");
        var li = document.createElement("li");
        li.textContent = action.replace(/_/g, " ") + " by " + j.vetter + " just now ";
        var b = document.createElement("button");  // as the page's own rows: withdraw this one
        b.className = "undo";
        b.type = "button";
        b.textContent = "withdraw";
        b.addEventListener("click", function () { withdraw(j.decision_id).then(null, function () {}); });
        li.appendChild(b);
        var none = ul.querySelector("li.muted"); if (none) none.remove();  // "none yet", not a withdrawal's note
        ul.insertBefore(li, ul.firstChild);
      }, function () {});
    }
    document.addEventListener("keydown", function (ev) {
      if (typing(ev) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
      var k = ev.key;
      if (k === "j" && body.dataset.next) go(function () { location = body.dataset.next; });
      else if (k === "k" && body.dataset.prev) go(function () { location = body.dataset.prev; });
      else if (k === "u" || k === "Escape") go(function () { back(); location = body.dataset.list; });
      else if (k === "z") undo();
      else if (KEYS[k]) act(KEYS[k]);
      else return;
      ev.preventDefault();
    });
  }
})();
