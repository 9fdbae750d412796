#!/usr/bin/env bash
# Debian's chromium for the report's headless-browser test (Playwright drives it through executable_path;
# `playwright install` would download a browser, which offline machines cannot). Idempotent; never fatal:
# the test skips with the reason when no chromium can be installed.
set -u
for exe in chromium chromium-browser; do
    if command -v "$exe" >/dev/null 2>&1; then echo "chromium: $(command -v "$exe")"; exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }
fi
if command -v chromium >/dev/null 2>&1; then echo "chromium: $(command -v chromium)"; else
    echo "chromium: not installed (apt-get install chromium as root); the browser test of report.html will skip"; fi
exit 0
