// The chatbot backend of docs/serving.md: Express in front of `farense serve`.
//   POST /api/ask   {prompt}             -> the object `farense ask` prints (fetch to farense's /ask)
//   POST /api/chat  {prompt, history?}   -> the answer as server-sent events `data: {"text": ...}`, then
//                                           `data: {"finish_reason": ...}`, through the openai package
//   GET  /api/model                      -> the model farense serves (base model and adapter version)
// Environment: FARENSE_URL (http://127.0.0.1:8080), FARENSE_API_KEY (when farense serve requires one),
// PORT (3000; 0 picks a free one). Run: npm install && node server.js
import express from "express";
import OpenAI from "openai";

const FARENSE = process.env.FARENSE_URL ?? "http://127.0.0.1:8080";
const KEY = process.env.FARENSE_API_KEY;
const PORT = Number(process.env.PORT ?? 3000);
// farense serve answers with its one model whatever `model` says; GET /api/model tells which it is.
const farense = new OpenAI({ baseURL: `${FARENSE}/v1`, apiKey: KEY ?? "none", timeout: 60_000, maxRetries: 1 });

const app = express();

app.post("/api/ask", express.json(), async (req, res) => {
  let r;
  try {
    r = await fetch(`${FARENSE}/ask`, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...(KEY ? { Authorization: `Bearer ${KEY}` } : {}) },
      body: JSON.stringify({ prompt: String(req.body?.prompt ?? ""), max_tokens: 256 }),
      signal: AbortSignal.timeout(30_000),
    });
  } catch (e) {
    return res.status(502).json({ status: "error", error: `farense serve unreachable: ${e.message}` });
  }
  const reply = await r.json(); // always JSON: the answer, or {status: "error", error, field?}
  if (r.status === 503) res.set("Retry-After", r.headers.get("Retry-After") ?? "1");
  res.status(r.status).json(reply);
});

app.post("/api/chat", express.json(), async (req, res) => {
  const history = Array.isArray(req.body?.history) ? req.body.history : [];
  const messages = [...history, { role: "user", content: String(req.body?.prompt ?? "") }];
  let stream;
  try {
    stream = await farense.chat.completions.create({ model: "farense", messages, max_tokens: 256, stream: true });
  } catch (e) {
    // farense's 4xx/503 arrive as OpenAI.APIError: pass its status and the field it names to the browser.
    const status = e instanceof OpenAI.APIError && e.status ? e.status : 502;
    return res.status(status).json({ status: "error", error: e.message, field: e.param ?? undefined });
  }
  res.on("close", () => res.writableFinished || stream.controller.abort()); // the browser left: stop generating
  res.set({ "Content-Type": "text/event-stream", "Cache-Control": "no-cache" }).flushHeaders();
  const send = (obj) => res.write(`data: ${JSON.stringify(obj)}\n\n`);
  try {
    for await (const chunk of stream) {
      const choice = chunk.choices[0];
      if (choice?.delta?.content) send({ text: choice.delta.content });
      if (choice?.finish_reason) send({ finish_reason: choice.finish_reason, tokens: chunk.usage?.completion_tokens });
    }
  } catch (e) {
    if (!res.writableEnded) send({ error: e.message });
  }
  res.end();
});

app.get("/api/model", async (_req, res) => {
  try {
    const { data } = await farense.models.list();
    res.json({ status: "ok", id: data[0].id, base_model: data[0].base_model, adapter: data[0].adapter });
  } catch (e) {
    res.status(e instanceof OpenAI.APIError && e.status ? e.status : 502).json({ status: "error", error: e.message });
  }
});

const server = app.listen(PORT, "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port} (farense serve at ${FARENSE})`);
});
