"""Data files shipped inside the package (the embedded tiny-shakespeare corpus)."""
