// Renders an Ollama TEMPLATE with Go's text/template, as Ollama does, for tests/test_modelfile.py.
//
//	go run tests/gotemplate_driver.go < {"template": "...", "messages": [{"role": ..., "content": ...}]}
//
// Ollama executes a Modelfile's TEMPLATE over a value whose .Messages holds the conversation
// (Role, Content); this driver gives it exactly that and prints the rendered prompt.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(req.Template))
	if err := tmpl.Execute(os.Stdout, struct{ Messages []message }{req.Messages}); err != nil {
		panic(err)
	}
}
