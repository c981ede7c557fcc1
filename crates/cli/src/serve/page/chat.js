// The chat page of `genius serve`: talks to this server's OpenAI API with
// fetch, streams answers as server-sent events, and renders them as a small
// subset of Markdown. Everything it needs is served by the binary itself.
'use strict';

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, models: [] };

// ---- Markdown: text is escaped first, so no model output becomes markup
// except what is built here.

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

function inline(text) {
  // Code spans keep their text as it is; the rest gets emphasis and links.
  return text.split(/(`[^`\n]+`)/).map((part) => {
    if (part.length > 1 && part.startsWith('`') && part.endsWith('`')) {
      return `<code>${escapeHtml(part.slice(1, -1))}</code>`;
    }
    return escapeHtml(part)
      .replace(/\*\*([^*\n]+)\*\*/g, '<strong>$1</strong>')
      .replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\w)/g, '$1<em>$2</em>')
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  }).join('');
}

function markdown(source) {
  const lines = source.split('\n');
  const out = [];
  let paragraph = [];
  let list = null;
  const flush = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(inline).join('<br>')}</p>`);
    paragraph = [];
    if (list) out.push(`</${list}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {
      flush();
      const code = [];
      for (i += 1; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i += 1) code.push(lines[i]);
      const lang = fence[1] ? ` class="language-${escapeHtml(fence[1])}"` : '';
      out.push(`<pre><code${lang}>${escapeHtml(code.join('\n'))}</code></pre>`);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/);
    if (heading) {
      flush();
      const level = Math.min(heading[1].length + 2, 6);
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
    } else if (item) {
      if (paragraph.length) flush();
      const kind = item[1] ? 'ul' : 'ol';
      if (list !== kind) {
        if (list) out.push(`</${list}>`);
        out.push(`<${kind}>`);
        list = kind;
      }
      out.push(`<li>${inline(item[3])}</li>`);
    } else if (/^\s*>/.test(line)) {
      flush();
      out.push(`<blockquote>${inline(line.replace(/^\s*>\s?/, ''))}</blockquote>`);
    } else if (line.trim() === '') {
      flush();
    } else {
      if (list) flush();
      paragraph.push(line);
    }
  }
  flush();
  return out.join('');
}

// ---- the conversation on screen

function bubble(role) {
  const node = document.createElement('div');
  node.className = `msg ${role}`;
  $('log').append(node);
  return node;
}

function showUser(text) {
  bubble('user').textContent = text;
}

function renderAssistant(node, answer) {
  let html = '';
  if (answer.reasoning) {
    const open = answer.content ? '' : ' open';
    html += `<details class="thinking"${open}><summary>Thinking</summary><div>${escapeHtml(answer.reasoning)}</div></details>`;
  }
  html += markdown(answer.content);
  if (answer.meta) html += `<div class="meta">${escapeHtml(answer.meta)}</div>`;
  node.innerHTML = html;
  node.scrollIntoView({ block: 'end' });
}

function setStatus(text) {
  $('status').textContent = text;
}

function setBusy(busy) {
  $('send').hidden = busy;
  $('stop').hidden = !busy;
  $('input').disabled = busy;
}

// ---- the API

function headers() {
  const h = { 'Content-Type': 'application/json' };
  const key = $('key').value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const response = await fetch('/v1/models', { headers: headers() });
  if (!response.ok) {
    setStatus(`Cannot list the models: ${await errorText(response)}`);
    if (response.status === 401) $('settings').open = true;
    return;
  }
  const body = await response.json();
  state.models = body.data.filter((m) => !m.embeds).map((m) => m.id);
  const select = $('model');
  const kept = localStorage.getItem('genius.model');
  select.replaceChildren(...state.models.map((id) => {
    const option = document.createElement('option');
    option.value = id;
    option.textContent = id;
    return option;
  }));
  if (kept && state.models.includes(kept)) select.value = kept;
  setStatus(state.models.length ? '' : 'This server serves no chat model.');
}

// Reads a server-sent event stream, calling `take` with each data object.
async function readEvents(response, take) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') return;
        take(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  const model = $('model').value;
  if (!model) {
    setStatus('Choose a model first.');
    return;
  }
  localStorage.setItem('genius.model', model);
  state.history.push({ role: 'user', content: text });
  showUser(text);
  const node = bubble('assistant');
  const answer = { content: '', reasoning: '', meta: '' };
  const messages = [];
  const system = $('system').value.trim();
  if (system) messages.push({ role: 'system', content: system });
  messages.push(...state.history);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setStatus(`${model} is answering...`);
  const started = performance.now();
  let usage = null;
  let drawn = false;
  const draw = () => {
    if (drawn) return;
    drawn = true;
    requestAnimationFrame(() => { drawn = false; renderAssistant(node, answer); });
  };
  try {
    const response = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model,
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($('temperature').value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta;
      if (delta?.content) answer.content += delta.content;
      if (delta?.reasoning_content) answer.reasoning += delta.reasoning_content;
      draw();
    });
    const seconds = (performance.now() - started) / 1000;
    answer.meta = usage
      ? `${usage.completion_tokens} tokens in ${seconds.toFixed(1)} s`
      : `${seconds.toFixed(1)} s`;
    setStatus('');
  } catch (err) {
    if (controller.signal.aborted) {
      answer.meta = 'stopped';
      setStatus('Stopped.');
    } else {
      node.classList.add('error');
      answer.meta = `error: ${err.message}`;
      setStatus('');
    }
  }
  state.controller = null;
  state.history.push({ role: 'assistant', content: answer.content });
  renderAssistant(node, answer);
  setBusy(false);
  $('input').focus();
}

// ---- wiring

window.addEventListener('DOMContentLoaded', () => {
  $('key').value = localStorage.getItem('genius.key') || '';
  $('system').value = localStorage.getItem('genius.system') || '';
  const temperature = localStorage.getItem('genius.temperature');
  if (temperature !== null) $('temperature').value = temperature;
  $('temperature-value').textContent = $('temperature').value;
  $('temperature').addEventListener('input', () => {
    $('temperature-value').textContent = $('temperature').value;
    localStorage.setItem('genius.temperature', $('temperature').value);
  });
  $('system').addEventListener('change', () => localStorage.setItem('genius.system', $('system').value));
  $('key').addEventListener('change', () => {
    localStorage.setItem('genius.key', $('key').value.trim());
    loadModels();
  });
  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    const text = $('input').value.trim();
    if (!text || state.controller) return;
    $('input').value = '';
    send(text);
  });
  $('input').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('stop').addEventListener('click', () => state.controller?.abort());
  $('new').addEventListener('click', () => {
    state.controller?.abort();
    state.history = [];
    $('log').replaceChildren();
    setStatus('');
    $('input').focus();
  });
  loadModels();
  $('input').focus();
});
