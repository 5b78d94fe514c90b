// The chat page: each answer streams in as sanitised Markdown, and the conversation so far is sent with each
// question; when it outgrows the model's context, its oldest turns are left out (the system prompt stays).
"use strict";
// The served model's name and its context length in tokens, as the server wrote them into the page.
const {model: MODEL, context: CONTEXT} = JSON.parse(document.getElementById("config").textContent);
const models = document.getElementById("model");
// The tokens kept free for an answer when older turns must go (as `astrai-ds chat` keeps): a default answer's
// length, unless that is most of the context.
const ROOM = Math.min(256, Math.floor(CONTEXT / 2));
const log = document.getElementById("log"), input = document.getElementById("input");
const send = document.getElementById("send"), stop = document.getElementById("stop");
const key = document.getElementById("key");
key.value = localStorage.getItem("astrai_api_key") || "";
key.addEventListener("change", () => { localStorage.setItem("astrai_api_key", key.value); listModels(); });
// The turns so far, oldest first: {question, answer, tokens (what the turn adds to the prompt), bubbles}.
let conversation = [], controller = null;
// What a question adds to the prompt, estimated: its characters times the tokens per character of the last answer
// the server counted, and the tokens around a turn (the chat template's) that the last counted prompt showed.
let tokensPerChar = 0.5, turnTokens = 0;

/** Offer the models the server answers as (GET /v1/models): the served model, and its -rag model that answers
 *  from a document index where the server has one. */
async function listModels() {
  try {
    const response = await fetch("/v1/models", {headers: key.value ? {"Authorization": "Bearer " + key.value} : {}});
    if (!response.ok) return;  // (a server with an API key, before the key is given)
    const names = (await response.json()).data.map(m => m.id), chosen = models.value;
    models.replaceChildren(...names.map(name => new Option(name, name)));
    models.value = names.includes(chosen) ? chosen : MODEL;
  } catch (error) {
    // the page goes on with the served model
  }
}
listModels();

// ---------------------------------------------------------------- rendering

// No HTML that a model writes can run script (DOMPurify removes script, event handlers and javascript: links),
// submit a form, or restyle the page; links open in a new tab.
const PURIFY = {FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"], FORBID_ATTR: ["style"],
                RETURN_DOM_FRAGMENT: true};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});

/** Show Markdown `text` (an answer, whole or as far as it came) as sanitised HTML in `element`. */
function renderMarkdown(element, text) {
  element.dataset.markdown = text;
  element.replaceChildren(DOMPurify.sanitize(marked.parse(text, {gfm: true, breaks: true}), PURIFY));
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

/** The documents a -rag model's answer was grounded in, under the answer. */
function showSources(answer, sources) {
  const div = document.createElement("div");
  div.className = "sources";
  div.textContent = "Sources: " + sources.map(s => `[${s.index}] ${[s.source, ...(s.headings || [])].join(" › ")}`)
    .join("; ");
  answer.after(div);
}

function showError(answer, text, message) {
  answer.classList.add("error");
  renderMarkdown(answer, text);
  const line = document.createElement("p");
  line.className = "error-message";
  line.textContent = "[" + message + "]";
  answer.appendChild(line);
}

// ---------------------------------------------------------------- fitting the context

function estimate(text) {
  return Math.ceil(text.length * tokensPerChar);
}

function sum(turns) {
  return turns.reduce((n, t) => n + t.tokens, 0);
}

/** The number of oldest turns to leave out so that the rest, the question and ROOM fit the context (as far as
 *  the server's counts of earlier prompts tell; the server's 400 for an over-long prompt settles the rest). */
function toLeaveOut(turns, question) {
  let total = sum(turns) + estimate(question) + turnTokens, first = 0;
  while (first < turns.length && total + ROOM > CONTEXT) total -= turns[first++].tokens;
  return first;
}

/** Whether the server refused the request because its prompt does not fit the model's context. */
function tooLong(status, error) {
  return status === 400 && error.code === "context_length_exceeded";
}

function leaveOut(turns, n, before) {
  for (const turn of turns.splice(0, n)) {
    for (const b of turn.bubbles) {
      b.classList.add("dropped");
      b.title = "left out of the conversation: the model no longer sees this turn";
    }
  }
  if (before.parentNode !== log) return;  // a new chat started meanwhile
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = `The oldest ${n === 1 ? "turn was" : n + " turns were"} left out: the conversation outgrew ` +
                     `the model's context (${CONTEXT} tokens).`;
  log.insertBefore(note, before);
}

// ---------------------------------------------------------------- asking

// A new chat stops the answer in progress; that request's end touches only its own (old) conversation.
document.getElementById("clear").onclick = () => {
  if (controller) controller.abort();
  conversation = [];
  log.textContent = "";
};
stop.onclick = () => { if (controller) controller.abort(); };

document.getElementById("form").onsubmit = async (event) => {
  event.preventDefault();
  const question = input.value.trim();
  if (!question || controller) return;
  input.value = "";
  const asked = bubble("user", question), turns = conversation;
  const system = document.getElementById("system").value.trim();
  const answer = bubble("assistant", "");
  answer.dataset.done = "false";
  controller = new AbortController();
  send.disabled = true; stop.disabled = false;
  // The served model's prompt is the conversation: the page estimates its length. A -rag model's prompt holds
  // retrieved text too, and the server fits it to the context itself.
  const model = models.value, plain = model === MODEL;
  let text = "", usage = null, first = 0;  // the oldest turn sent
  try {
    if (plain) first = toLeaveOut(turns, question);
    let response;
    for (;;) {
      const messages = (system ? [{role: "system", content: system}] : []).concat(
        ...turns.slice(first).map(t => [{role: "user", content: t.question}, {role: "assistant", content: t.answer}]),
        [{role: "user", content: question}]);
      const headers = {"Content-Type": "application/json"};
      if (key.value) headers["Authorization"] = "Bearer " + key.value;
      response = await fetch("/v1/chat/completions", {
        method: "POST", headers, signal: controller.signal,
        body: JSON.stringify({model, messages, stream: true, stream_options: {include_usage: true},
                              temperature: parseFloat(document.getElementById("temperature").value) || 0}),
      });
      if (response.ok) break;
      const body = await response.json().catch(() => ({}));
      const error = body.error || {};
      if (first < turns.length && tooLong(response.status, error)) { first++; continue; }
      throw new Error(error.message || response.statusText);
    }
    if (first) leaveOut(turns, first, asked);  // for good: the next turns build on what the model saw
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const before = text;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          if (chunk.sources && chunk.sources.length) showSources(answer, chunk.sources);
          const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
          if (delta) text += delta;
        }
      }
      if (text !== before) { renderMarkdown(answer, text); log.scrollTop = log.scrollHeight; }
    }
  } catch (error) {
    if (error.name !== "AbortError") showError(answer, text, error.message);
  } finally {
    if (text) {
      let tokens = estimate(question) + turnTokens + estimate(text);
      if (usage && plain) {  // the server's count: the prompt with this answer, less the turns before it
        const before = sum(turns);
        if (turns.length && !first) turnTokens = Math.max(usage.prompt_tokens - before - estimate(question), 0);
        tokens = Math.max(usage.prompt_tokens + usage.completion_tokens - before, 0);
        if (text.length >= 16) tokensPerChar = usage.completion_tokens / text.length;
      }
      turns.push({question, answer: text, tokens, bubbles: [asked, answer]});
    } else {  // no answer (an error, or stopped before any text): the question is not sent again with the next one
      asked.classList.add("unanswered");
      asked.title = "not answered: not part of the conversation";
    }
    answer.dataset.done = "true";
    controller = null;
    send.disabled = false; stop.disabled = true;
    input.focus();
  }
};
