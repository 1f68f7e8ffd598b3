#!/usr/bin/env bash
# Installs Debian's chromium + chromium-driver for the browser tests when they are missing and we
# are root (CI, fresh dev machines). Without them the browser tests skip with a clear reason.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-browser: chromium/chromedriver missing and cannot apt-get here; browser tests will skip" >&2
  exit 0
fi
echo "ensure-browser: installing chromium + chromium-driver (Debian packages)" >&2
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
  || echo "ensure-browser: install failed; browser tests will skip" >&2
