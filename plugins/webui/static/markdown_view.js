// Model output is untrusted.  It becomes DOM in one way only: Markdown parsed by marked (raw HTML
// in it is escaped, so it shows as text), code highlighted by highlight.js, the whole result
// sanitized by DOMPurify into a DOM fragment, never assigned as HTML.
/* global marked, DOMPurify, hljs */

const escapes = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => escapes[c]);

function highlighted(text, lang) {
  const known = lang && hljs.getLanguage(lang) ? lang : null;
  const result = known
    ? hljs.highlight(text, { language: known, ignoreIllegals: true })
    : hljs.highlightAuto(text);
  return { html: result.value, language: result.language || known || "" };
}

const parser = new marked.Marked({
  gfm: true,
  async: false,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    code({ text, lang }) {
      const { html, language } = highlighted(text, (lang || "").trim().split(/\s+/)[0]);
      const label = language ? ` language-${escapeHtml(language)}` : "";
      return `<pre><code class="hljs${label}">${html}</code></pre>\n`;
    },
  },
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option"],
  FORBID_ATTR: ["style"],
};

// Links open in a new tab without a referrer; images other than data: URLs (which the page's
// CSP would block anyway, and which could tell a third party the page was read) become their alt text.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
  if (node.tagName === "IMG" && !(node.getAttribute("src") || "").startsWith("data:image/")) {
    node.replaceWith(document.createTextNode(node.getAttribute("alt") || ""));
  }
});

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");  // plain http on another host: no Clipboard API
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  return Promise.resolve();
}

function addCopyButtons(fragment) {
  for (const pre of fragment.querySelectorAll("pre")) {
    const block = document.createElement("div");
    block.className = "code-block";
    pre.replaceWith(block);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.addEventListener("click", () => {
      copyText(pre.textContent).then(() => {
        button.textContent = "Copied";
        setTimeout(() => { button.textContent = "Copy"; }, 1500);
      }, () => { button.textContent = "Copy failed"; });
    });
    block.append(pre, button);
  }
}

// Replace the children of `target` with `markdown` rendered.
export function renderMarkdown(target, markdown) {
  const fragment = DOMPurify.sanitize(parser.parse(markdown || ""), PURIFY);
  addCopyButtons(fragment);
  target.replaceChildren(fragment);
}
