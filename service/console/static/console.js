// The console's own script (htmx does the rest). htmx swaps no error answer: an action whose request got a 5xx,
// or no answer at all (the server restarting), did nothing visible, and the agent clicked again not knowing
// whether the first click was carried out. Say so at the top of the page until the next request.
(function () {
  "use strict";

  function say(text) {
    const box = document.getElementById("request-error");
    if (box === null) {
      return;
    }
    box.textContent = text;
    box.hidden = false;
    box.focus();
  }

  document.addEventListener("htmx:beforeRequest", function () {
    const box = document.getElementById("request-error");
    if (box !== null) {
      box.hidden = true;
    }
  });
  document.addEventListener("htmx:responseError", function (event) {
    const xhr = event.detail.xhr;
    say(
      "The server could not do this (HTTP " + xhr.status + (xhr.statusText ? " " + xhr.statusText : "") + "). " +
      "Reload the page to see the order as it is now, and whether anything was done, before acting again."
    );
  });
  document.addEventListener("htmx:sendError", function () {
    say(
      "No answer came from the server (it may be restarting, or the network is down). " +
      "Reload the page to see whether anything was done before acting again."
    );
  });
})();
