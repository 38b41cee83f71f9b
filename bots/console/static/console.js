// chatloop operator console: keyboard shortcuts for the review queue (no dependencies).
// j / k: next / previous item; a: approve (with any edit); r: reject; e: edit the proposal.
(function () {
  "use strict";
  var items = Array.prototype.slice.call(document.querySelectorAll(".item"));
  if (!items.length) return;
  var at = 0;
  function show(i) {
    if (i < 0 || i >= items.length) return;
    items[at].classList.remove("current");
    at = i;
    items[at].classList.add("current");
    items[at].scrollIntoView({block: "nearest"});
  }
  function submit(action) {
    var form = items[at].querySelector("form.decide");
    form.querySelector("input[name=action]").value = action;
    form.submit();
  }
  items[0].classList.add("current");
  items.forEach(function (item, i) {
    item.addEventListener("click", function () { show(i); });
    item.querySelectorAll("button[data-action]").forEach(function (b) {
      b.addEventListener("click", function (ev) {
        ev.preventDefault(); show(i); submit(b.getAttribute("data-action"));
      });
    });
  });
  document.addEventListener("keydown", function (ev) {
    var tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "textarea" || tag === "input" || ev.ctrlKey || ev.metaKey || ev.altKey) {
      if (ev.key === "Escape") ev.target.blur();
      return;
    }
    if (ev.key === "j") show(at + 1);
    else if (ev.key === "k") show(at - 1);
    else if (ev.key === "a") submit("approve");
    else if (ev.key === "r") submit("reject");
    else if (ev.key === "e") { ev.preventDefault(); items[at].querySelector("textarea").focus(); }
    else return;
    ev.preventDefault();
  });
})();
