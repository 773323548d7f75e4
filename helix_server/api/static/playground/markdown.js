// A small, safe Markdown subset for model output: the text is HTML-escaped FIRST, then fenced code,
// inline code, **bold**, *italic*, headings and lists are applied with fixed tags. No links, no raw
// HTML: nothing the model writes can become markup of its own.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

export function renderMarkdown(source) {
  // Even parts are prose, odd parts are fenced code (an unclosed fence runs to the end).
  return source
    .split("```")
    .map((part, i) => (i % 2 ? codeBlock(part) : prose(part)))
    .join("");
}

function codeBlock(part) {
  const newline = part.indexOf("\n");
  const head = newline >= 0 ? part.slice(0, newline).trim() : "";
  const isLang = newline >= 0 && /^[\w+#.-]{0,20}$/.test(head);
  const code = isLang ? part.slice(newline + 1) : part;
  const lang = isLang && head ? ` data-lang="${escapeHtml(head)}"` : "";
  return `<pre><code${lang}>${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`;
}

function inline(text) {
  // Odd parts are `inline code`; bold and italic apply only outside it.
  return text
    .split("`")
    .map((part, i, all) => {
      if (i % 2 && i < all.length - 1) return `<code>${escapeHtml(part)}</code>`;
      const prefix = i % 2 ? "`" : "";
      return (prefix + escapeHtml(part))
        .replace(/\*\*(\S(?:.*?\S)?)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*])\*(\S(?:.*?\S)?)\*(?!\*)/g, "$1<em>$2</em>");
    })
    .join("");
}

function prose(text) {
  const out = [];
  let list = null;
  let paragraph = [];
  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((item) => `<li>${inline(item)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (const line of text.split("\n")) {
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const item = /^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/.exec(line);
    if (heading) {
      flushParagraph();
      flushList();
      out.push(`<h4>${inline(heading[2])}</h4>`);
    } else if (item) {
      flushParagraph();
      const tag = item[1] ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      list = list || { tag, items: [] };
      list.items.push(item[3]);
    } else if (!line.trim()) {
      flushParagraph();
      flushList();
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flushParagraph();
  flushList();
  return out.join("");
}
