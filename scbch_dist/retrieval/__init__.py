"""Searching a finished run's codes (docs/search.md): the Hamming index over the codes (``hamming``,
``index``), the query encoders that replay the run's model (``query``), the search command
(``search``) and the web page and JSON API (``serve``)."""
