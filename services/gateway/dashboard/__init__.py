"""The live spend dashboard, served by the gateway at ``/dashboard`` (issue #13).

``routes`` (pages, sign-in and the page script's JSON), ``session`` (the signed session
cookie and CSRF tokens), ``state`` (per-process caches and the pipeline probe),
``templates/`` (Jinja2, server-rendered) and ``static/`` (the page script, its styles and the
vendored uPlot chart library): everything is packaged, nothing is fetched from elsewhere.
"""
