// The console's own script: what htmx does not do. Loaded from this origin only (the
// Content-Security-Policy forbids inline script), so every behaviour is bound here.
"use strict";
(function () {
  function csrf() { return document.body.dataset.csrf || ""; }

  // Forms marked "confirm" ask before they submit (delete, cancel).
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.classList && form.classList.contains("confirm")) {
      if (!window.confirm(form.dataset.confirm || "?")) { event.preventDefault(); }
    }
  }, true);

  // Package upload: the file is sent as the request body, as the management API takes it,
  // with a progress bar; the size limit is checked first so a too-large file is refused at once.
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("upload");
    if (!form) { return; }
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var file = form.querySelector("input[type=file]").files[0];
      var message = document.getElementById("upload-message");
      var bar = document.getElementById("upload-progress");
      var max = Number(form.dataset.max || 0);
      if (!file) { return; }
      if (max && file.size > max) { message.textContent = form.dataset.tooLarge; message.className = "message error"; return; }
      var query = new URLSearchParams();
      query.set("pid", form.elements.pid.value);
      query.set("type", form.elements.type.value);
      query.set("target", form.elements.target.value);
      query.set("file_name", file.name);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.getAttribute("action") + "?" + query.toString());
      xhr.setRequestHeader("X-CSRF-Token", csrf());
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      bar.hidden = false; bar.value = 0; message.textContent = ""; message.className = "message";
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) { bar.value = Math.round(100 * e.loaded / e.total); }
      });
      xhr.addEventListener("load", function () {
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
        if (xhr.status >= 200 && xhr.status < 300) {
          bar.value = 100;
          window.location.reload();
        } else {
          message.className = "message error";
          message.textContent = (body && body.error && body.error.message) || ("HTTP " + xhr.status);
        }
      });
      xhr.addEventListener("error", function () { message.className = "message error"; message.textContent = "network error"; });
      xhr.send(file);
    });
  });
})();
