from pixelmill.cli import app

app(prog_name="pixelmill")
