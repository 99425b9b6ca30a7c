"""Built-in tools a model can call: the calculator, file reading, HTTP requests."""
