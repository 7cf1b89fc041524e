// The two pages the auth service's mails link to. The token travels in the URL's fragment, which no
// server or log on the way sees; it is read here, then removed from the address bar and history.
"use strict";

(function () {
  const status = document.getElementById("status");
  const page = document.body.dataset.page;

  function say(text, kind) {
    status.textContent = text;
    status.className = kind || "";
  }

  function takeToken() {
    const token = new URLSearchParams(window.location.hash.slice(1)).get("token");
    history.replaceState(null, "", window.location.pathname + window.location.search);
    return token;
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    let answer = null;
    try {
      answer = await response.json();
    } catch (error) {
      answer = null;
    }
    return { ok: response.ok, status: response.status, answer: answer };
  }

  function problem(result) {
    const title = result.answer && typeof result.answer.title === "string" ? result.answer.title : null;
    return title || "Something went wrong (HTTP " + result.status + "); try again later.";
  }

  const token = takeToken();
  if (!token) {
    say("This link is incomplete: open the link from the mail again.", "error");
    return;
  }

  if (page === "verify-email") {
    post("../email/verify", { token: token }).then(
      function (result) {
        if (result.ok) {
          say("Your email address " + result.answer.user.email + " is confirmed. You can close this page.", "done");
        } else {
          say(problem(result), "error");
        }
      },
      function () {
        say("The service could not be reached; try again later.", "error");
      }
    );
  } else if (page === "reset-password") {
    const form = document.getElementById("reset");
    form.hidden = false;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      const password = form.elements.password.value;
      if (password !== form.elements.again.value) {
        say("The two passwords differ.", "error");
        return;
      }
      form.querySelector("button").disabled = true;
      post("../password/reset", { token: token, password: password }).then(
        function (result) {
          if (result.ok) {
            form.hidden = true;
            say("Your password is changed, and every other session is signed out. Sign in with it now.", "done");
          } else {
            form.querySelector("button").disabled = false;
            say(problem(result), "error");
          }
        },
        function () {
          form.querySelector("button").disabled = false;
          say("The service could not be reached; try again later.", "error");
        }
      );
    });
  }
})();
