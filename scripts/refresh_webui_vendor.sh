#!/usr/bin/env bash
# Refresh the chat page's vendored front-end libraries (plugins/webui/static/vendor/) from npm.
# Node is needed only here, never to install or run Shimmy: the built files are committed.
#
#   scripts/refresh_webui_vendor.sh            # the pinned versions below
#   MARKED=18.3.1 scripts/refresh_webui_vendor.sh
#
# Each package is fetched with `npm pack` (the registry's tarball, no install scripts run), and
# its built browser file and licence are copied in.  The "//# sourceMappingURL" comment is
# dropped from each script: the maps are not shipped, and a browser would ask the server for them.
set -euo pipefail

MARKED=${MARKED:-18.3.0}
DOMPURIFY=${DOMPURIFY:-3.5.0}
HIGHLIGHTJS=${HIGHLIGHTJS:-11.12.0}

root="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$root/plugins/webui/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

unpack() {  # unpack NAME VERSION FOLDER: npm pack NAME@VERSION and unpack it into $work/FOLDER
    (cd "$work" && npm pack --silent "$1@$2" > "$3.tgz.name")
    mkdir -p "$work/$3"
    tar -xzf "$work/$(cat "$work/$3.tgz.name")" -C "$work/$3" --strip-components=1
}

copy_script() {  # copy_script FROM TO: a built script without its source-map comment
    sed '/^\/\/# sourceMappingURL=/d' "$1" > "$2"
}

unpack marked "$MARKED" marked
unpack dompurify "$DOMPURIFY" dompurify
unpack @highlightjs/cdn-assets "$HIGHLIGHTJS" highlightjs

rm -rf "$vendor"
mkdir -p "$vendor/marked" "$vendor/dompurify" "$vendor/highlightjs"
copy_script "$work/marked/lib/marked.umd.js" "$vendor/marked/marked.umd.js"
cp "$work/marked/LICENSE" "$vendor/marked/LICENSE"
copy_script "$work/dompurify/dist/purify.min.js" "$vendor/dompurify/purify.min.js"
cp "$work/dompurify/LICENSE" "$vendor/dompurify/LICENSE"
copy_script "$work/highlightjs/highlight.min.js" "$vendor/highlightjs/highlight.min.js"
cp "$work/highlightjs/styles/github.min.css" "$vendor/highlightjs/github.min.css"
cp "$work/highlightjs/styles/github-dark.min.css" "$vendor/highlightjs/github-dark.min.css"
cp "$work/highlightjs/LICENSE" "$vendor/highlightjs/LICENSE"

version() { node -p "require('$work/$1/package.json').version"; }
license() { node -p "require('$work/$1/package.json').license"; }
cat > "$vendor/VERSIONS.md" <<EOF
# Vendored front-end libraries of the chat page

Built files copied from npm by \`scripts/refresh_webui_vendor.sh\` (run it to update them; change
the pinned versions at its top). Nothing here is built at install time. The scripts' source-map
comments are removed; nothing else is changed.

| Package | Version | License | Source | Files |
|---|---|---|---|---|
| marked | $(version marked) | $(license marked) | https://www.npmjs.com/package/marked (https://github.com/markedjs/marked) | marked/marked.umd.js, marked/LICENSE |
| dompurify | $(version dompurify) | $(license dompurify) | https://www.npmjs.com/package/dompurify (https://github.com/cure53/DOMPurify) | dompurify/purify.min.js, dompurify/LICENSE (Apache-2.0 chosen) |
| @highlightjs/cdn-assets | $(version highlightjs) | $(license highlightjs) | https://www.npmjs.com/package/@highlightjs/cdn-assets (https://github.com/highlightjs/highlight.js) | highlightjs/highlight.min.js, highlightjs/github.min.css, highlightjs/github-dark.min.css, highlightjs/LICENSE |
EOF
echo "refreshed $vendor:"
(cd "$vendor" && find . -type f | sort | xargs ls -l)
