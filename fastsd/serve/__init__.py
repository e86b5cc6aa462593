"""python -m fastsd.serve: an AUTOMATIC1111-compatible HTTP API and a web page (README "Serving").

app.py        the FastAPI app: routes, errors, body limit     schemas.py   A1111's request shapes
generation.py request -> checked Plan -> images -> response   jobqueue.py  the bounded FIFO and its worker
registry.py   the --model models and the current one          networks.py  LoRAs / embeddings by name
limits.py     per-request limits and base64 image decoding    auth.py      --api-auth / --token
upscalers.py  --upscaler-dir models by name, the Extras tab's upscale
vaes.py       --vae-dir files by name, A1111's sd_vae option, the VAE swapped before each job
imageformat.py  A1111's samples_format / jpeg_quality: PNG, or JPEG / WEBP with the infotext in EXIF
infotext.py   A1111's `infotext` request field: an infotext fills the fields the request did not set
static/       the page (plain HTML/JS/CSS, no build step)
"""
