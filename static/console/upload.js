/* Firmware upload with a progress bar.
 *
 * Posts the form to the API (POST /api/v1/firmware) with XMLHttpRequest, because fetch() cannot
 * report upload progress. The session cookie authenticates and the form's CSRF token goes in the
 * X-CSRFToken header. Errors come back in the API's shape {code, detail, errors} and are shown
 * next to their fields. On success the browser goes to the new firmware's page.
 */
(function () {
  "use strict";

  var form = document.getElementById("upload-form");
  if (!form) return;

  var bar = form.querySelector("progress");
  var box = form.querySelector(".upload-progress");
  var status = form.querySelector(".upload-status");
  var button = form.querySelector("button[type=submit]");

  function showError(field, text) {
    var slot = form.querySelector('[data-error="' + field + '"]') ||
      form.querySelector('[data-error="non_field"]');
    slot.textContent = slot.textContent ? slot.textContent + " " + text : text;
    slot.hidden = false;
  }

  function clearErrors() {
    form.querySelectorAll("[data-error]").forEach(function (slot) {
      slot.textContent = "";
      slot.hidden = true;
    });
  }

  function showResponse(xhr) {
    var body = null;
    try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
    if (!body) {
      showError("non_field", "The server answered " + xhr.status + " " + xhr.statusText + ".");
      return;
    }
    var errors = body.errors || {};
    var fields = Object.keys(errors);
    fields.forEach(function (field) {
      var messages = errors[field];
      var name = field === "non_field_errors" ? "non_field" : field;
      showError(name, Array.isArray(messages) ? messages.join(" ") : String(messages));
    });
    if (!fields.length) showError("non_field", body.detail || "The upload failed.");
  }

  function done() {
    button.disabled = false;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    clearErrors();
    var file = form.elements.file.files[0];
    if (!file) { showError("file", "Choose a firmware image."); return; }
    var max = Number(form.dataset.maxSize || 0);
    if (max && file.size > max) {
      showError("file", "The image is " + file.size + " bytes; the limit is " + max + ".");
      return;
    }
    var data = new FormData(form);
    data.delete("csrfmiddlewaretoken");
    // Blank optional fields are left out so that the server applies its defaults.
    ["min_version", "release_counter", "release_notes"].forEach(function (name) {
      if (!String(data.get(name) || "").trim()) data.delete(name);
    });

    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.endpoint);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRFToken", form.elements.csrfmiddlewaretoken.value);
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      var percent = Math.floor((e.loaded / e.total) * 100);
      bar.value = percent;
      status.textContent = percent < 100 ? "Uploading… " + percent + "%" : "Verifying…";
    });
    xhr.addEventListener("load", function () {
      if (xhr.status === 201) {
        var created = JSON.parse(xhr.responseText);
        status.textContent = "Uploaded.";
        window.location.assign(form.dataset.detailBase + created.id + "/");
        return;
      }
      box.hidden = true;
      showResponse(xhr);
      done();
    });
    xhr.addEventListener("error", function () {
      box.hidden = true;
      showError("non_field", "The connection failed during the upload; try again.");
      done();
    });
    bar.value = 0;
    status.textContent = "Uploading… 0%";
    box.hidden = false;
    button.disabled = true;
    xhr.send(data);
  });
})();
