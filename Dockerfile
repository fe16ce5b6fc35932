# The Astro project's image (`astro dev start`, `astro deploy`): Astro Runtime, plus what the sync needs on top of
# its Airflow, plus the project (dags/, plugins/, include/ ... under /usr/local/airflow).
#
# Astro Runtime 3.3-8 is Apache Airflow 3.3.2, the version requirements.txt pins (Astronomer's runtime catalog,
# https://updates.astronomer.io/astronomer-runtime; release notes: https://www.astronomer.io/docs/runtime/
# runtime-release-notes). Runtime 3.3 ships Python 3.12, 3.13 and 3.14 (default 3.14); 3.12 is the closest to the
# 3.11 the test suite runs on, and every pin of requirements-deploy.txt has a wheel for it. The tag was not pulled
# when this file was written (no registry access): `docker run --rm <image> airflow version` should say
# 3.3.2+astro.N. When upgrading Airflow, move requirements.txt's apache-airflow pin and this tag together.
#
# Why the "-base" flavour: the default Runtime image runs ONBUILD steps that install the project's
# requirements.txt, refuse one that names apache-airflow ("change the base image instead") and would otherwise
# re-pin the image's packages. Here requirements.txt is the local .venv's full lock (Airflow, the sandboxes, the
# tests), so the same steps are spelled out below, in the same order, installing requirements-deploy.txt
# (the product's packages without Airflow's) instead. The base image's FROM line must stay literal: the Astro CLI
# reads the Runtime version from it.
FROM astrocrpublic.azurecr.io/runtime:3.3-8-python-3.12-base

SHELL ["/bin/bash", "-o", "pipefail", "-e", "-u", "-c"]
WORKDIR /usr/local/airflow

# 1. Debian packages (packages.txt; none today: see the file).
USER root
COPY packages.txt .
RUN if grep -qvE '^[[:space:]]*(#|$)' packages.txt; then \
      apt-get update \
      && sed -e 's/#.*//' packages.txt | xargs apt-get install -y --no-install-recommends \
      && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi

# 2. The sync's Python packages. Every package the image already has keeps its version (Airflow, its providers
# and their dependencies are constraints, as installed), except the ones requirements-deploy.txt pins itself. A
# pin that needs another version of one of the image's packages fails the build and names both, instead of
# re-pinning the image: then use the Runtime whose Airflow requirements.txt pins, or regenerate
# requirements-deploy.txt (its header says how). tests/deploy/test_fresh_deployment.py installs it the same way.
COPY requirements-deploy.txt .
RUN own="$(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' requirements-deploy.txt | sed 's/[-_.]/[-_.]/g' | paste -sd'|')" \
    && python -m pip list --format=freeze | grep -viE "^(${own})==" > /tmp/image-packages.txt \
    && python -m pip install --no-cache-dir --root-user-action=ignore \
         -r requirements-deploy.txt -c /tmp/image-packages.txt \
    && rm /tmp/image-packages.txt

# 3. The project. The engine (include/mdsync) is not installed: plugins/mdsync_airflow puts include/ on sys.path
# itself when it imports, and PYTHONPATH makes it importable for the command-line tools too
# (`python -m mdsync.lease`, `python -m mdsync.activity`, the sandboxes) in `astro dev bash`.
USER astro
COPY --chown=astro:0 . .
ENV PYTHONPATH="/usr/local/airflow/include${PYTHONPATH:+:${PYTHONPATH}}"
