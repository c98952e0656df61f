// The qscorer web page: choose or drop images, POST them to the service, show each score and the
// score-token probabilities. Plain browser JavaScript, no dependencies, works offline.
"use strict";

const drop = document.getElementById("drop");
const fileInput = document.getElementById("files");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const keyRow = document.getElementById("key-row");
const keyInput = document.getElementById("api-key");

function authHeaders() {
  return keyInput.value ? { Authorization: "Bearer " + keyInput.value } : {};
}

function showStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(isError));
}

async function describeService() {
  const health = await (await fetch("health")).json();
  keyRow.hidden = !health.api_key_required;
  if (health.api_key_required && !keyInput.value) return;
  const response = await fetch("info", { headers: authHeaders() });
  if (!response.ok) return;
  const info = await response.json();
  const model = info.model.model_path ? info.model.model_path + " · " : "";
  document.getElementById("model").textContent =
    model + info.device + " · " + info.dtype + " · prompt " + info.prompt + " · qscorer " + info.qscorer_version;
}

function renderCard(file, result) {
  const card = document.getElementById("card").content.firstElementChild.cloneNode(true);
  card.dataset.image = result.image;
  card.dataset.score = String(result.score);
  const image = card.querySelector("img");
  image.src = URL.createObjectURL(file);
  image.alt = result.image;
  card.querySelector(".name").textContent = result.image;
  card.querySelector(".score").textContent = result.score.toFixed(3);
  const tokens = Object.keys(result.probs);
  const total = tokens.reduce((sum, token) => sum + result.probs[token], 0) || 1;
  const bars = card.querySelector(".bars");
  for (const token of tokens) {
    const share = result.probs[token] / total;
    const row = document.createElement("div");
    row.className = "bar";
    row.title = token + ": probability " + result.probs[token].toExponential(3) + ", logit " +
      result.logits[token].toFixed(4);
    row.innerHTML = '<span class="token"></span><span class="track"><span class="fill"></span></span>' +
      '<span class="value"></span>';
    row.querySelector(".token").textContent = token;
    row.querySelector(".fill").style.width = (100 * share).toFixed(1) + "%";
    row.querySelector(".value").textContent = (100 * share).toFixed(1) + "%";
    bars.appendChild(row);
  }
  return card;
}

async function scoreFiles(files) {
  const images = Array.from(files).filter((file) => file.type.startsWith("image/") || file.type === "");
  if (!images.length) {
    showStatus("No image files among the dropped items.", true);
    return;
  }
  const form = new FormData();
  for (const file of images) form.append("images", file, file.name);
  showStatus("Scoring " + images.length + " image" + (images.length > 1 ? "s" : "") + "…");
  try {
    const response = await fetch("score", { method: "POST", body: form, headers: authHeaders() });
    const body = await response.json();
    if (!response.ok) {
      showStatus("Error " + response.status + ": " + body.error, true);
      return;
    }
    results.replaceChildren(...body.results.map((result, index) => renderCard(images[index], result)));
    showStatus("Scored " + body.results.length + " image" + (body.results.length > 1 ? "s" : "") + ".");
  } catch (error) {
    showStatus("The service did not answer: " + error, true);
  }
}

fileInput.addEventListener("change", () => {
  scoreFiles(fileInput.files);
  fileInput.value = "";
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  scoreFiles(event.dataTransfer.files);
});
keyInput.addEventListener("change", describeService);
describeService().catch((error) => showStatus("The service did not answer: " + error, true));
