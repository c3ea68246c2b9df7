"""The review pages: static HTML, JavaScript and CSS (no build step)."""
