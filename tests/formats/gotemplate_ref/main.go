// Reference renderer for mlxlite's Go-template tests: Go's own text/template, run the way
// Ollama's template package runs a model's template, over the same data types.
//
// Reads a JSON array of cases on stdin, writes a JSON array of {"out"} or {"error"}.
// A case is {"template", "data"} (raw: the data as decoded JSON, Ollama's functions,
// missingkey=zero) or {"template", "messages", "tools", "think"} (Ollama: collated messages,
// typed tool values, the messages path or the legacy per-turn path). Standard library only.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

func toJSON(v any) string { b, _ := json.Marshal(v); return string(b) }

// ---- the values a template sees ----------------------------------------------------------
type PropType []string

func (p *PropType) UnmarshalJSON(b []byte) error {
	var one string
	if json.Unmarshal(b, &one) == nil {
		*p = PropType{one}
		return nil
	}
	var many []string
	err := json.Unmarshal(b, &many)
	*p = many
	return err
}

func (p PropType) MarshalJSON() ([]byte, error) {
	if len(p) == 1 {
		return json.Marshal(p[0])
	}
	return json.Marshal([]string(p))
}

func (p PropType) String() string {
	switch len(p) {
	case 0:
		return ""
	case 1:
		return p[0]
	}
	return "[" + strings.Join(p, " ") + "]"
}

type Prop struct {
	AnyOf       []Prop   `json:"anyOf,omitempty"`
	Type        PropType `json:"type,omitempty"`
	Items       any      `json:"items,omitempty"`
	Description string   `json:"description,omitempty"`
	Enum        []any    `json:"enum,omitempty"`
	Properties  *Props   `json:"properties,omitempty"`
	Required    []string `json:"required,omitempty"`
}

type Props map[string]Prop

func (p Props) String() string {
	if p == nil {
		return "{}"
	}
	return toJSON(map[string]Prop(p))
}

type Params struct {
	Type       string   `json:"type"`
	Defs       any      `json:"$defs,omitempty"`
	Items      any      `json:"items,omitempty"`
	Required   []string `json:"required,omitempty"`
	Properties Props    `json:"properties"`
}

func (p Params) String() string { return toJSON(p) }

type Function struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Parameters  Params `json:"parameters"`
}

func (f Function) String() string { return toJSON(f) }

type Tool struct {
	Type     string   `json:"type"`
	Items    any      `json:"items,omitempty"`
	Function Function `json:"function"`
}

func (t Tool) String() string { return toJSON(t) }

type Tools []Tool

func (t Tools) String() string { return toJSON([]Tool(t)) }

type Args map[string]any

func (a Args) String() string {
	if a == nil {
		return "{}"
	}
	return toJSON(map[string]any(a))
}

type CallFunction struct {
	Index     int
	Name      string
	Arguments Args
}

type Call struct {
	ID       string
	Function CallFunction
}

type Message struct {
	Role       string
	Content    string
	Thinking   string
	Images     [][]byte
	ToolCalls  []Call
	ToolName   string
	ToolCallID string
}

// What arrives on stdin (the API's field names).
type inMessage struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Thinking  string `json:"thinking"`
	ToolCalls []struct {
		ID       string `json:"id"`
		Function struct {
			Index     int            `json:"index"`
			Name      string         `json:"name"`
			Arguments map[string]any `json:"arguments"`
		} `json:"function"`
	} `json:"tool_calls"`
	ToolName   string `json:"tool_name"`
	ToolCallID string `json:"tool_call_id"`
}

type inCase struct {
	Template string          `json:"template"`
	Data     json.RawMessage `json:"data"`
	Messages []inMessage     `json:"messages"`
	Tools    *Tools          `json:"tools"`
	Think    any             `json:"think"`
}

var funcs = template.FuncMap{
	"json":          func(v any) string { b, _ := json.Marshal(v); return string(b) },
	"currentDate":   func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string {
		p, ok := v.(Prop)
		if !ok {
			return "any"
		}
		return tsType(p)
	},
}

func tsType(p Prop) string {
	if len(p.AnyOf) > 0 {
		var parts []string
		for _, q := range p.AnyOf {
			parts = append(parts, tsType(q))
		}
		return strings.Join(parts, " | ")
	}
	names := map[string]string{"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
		"array": "any[]", "object": "Record<string, any>", "null": "null"}
	if len(p.Type) == 0 {
		return "any"
	}
	var parts []string
	for _, t := range p.Type {
		if n, ok := names[t]; ok {
			parts = append(parts, n)
		} else {
			parts = append(parts, "any")
		}
	}
	return strings.Join(parts, " | ")
}

// ---- Ollama's rules, restated ----------------------------------------------------------------
// names: every field and variable identifier, lower-cased.
func names(n parse.Node, out map[string]bool) error {
	switch n := n.(type) {
	case *parse.ListNode:
		for _, c := range n.Nodes {
			if err := names(c, out); err != nil {
				return err
			}
		}
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return errors.New("undefined template specified")
		}
		return names(n.Pipe, out)
	case *parse.ActionNode:
		return names(n.Pipe, out)
	case *parse.IfNode:
		return names(&n.BranchNode, out)
	case *parse.RangeNode:
		return names(&n.BranchNode, out)
	case *parse.WithNode:
		return names(&n.BranchNode, out)
	case *parse.BranchNode:
		for _, part := range []parse.Node{n.Pipe, n.List} {
			if err := names(part, out); err != nil {
				return err
			}
		}
		if n.ElseList != nil {
			return names(n.ElseList, out)
		}
	case *parse.PipeNode:
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				if err := names(a, out); err != nil {
					return err
				}
			}
		}
	case *parse.FieldNode:
		for _, s := range n.Ident {
			out[strings.ToLower(s)] = true
		}
	case *parse.VariableNode:
		for _, s := range n.Ident {
			out[strings.ToLower(s)] = true
		}
	}
	return nil
}

// cutAfterResponse keeps the first .Response field and drops everything after it.
func cutAfterResponse(root *parse.ListNode) *parse.ListNode {
	cut := false
	drop := func(n parse.Node) bool {
		if f, ok := n.(*parse.FieldNode); ok {
			for _, s := range f.Ident {
				if s == "Response" {
					cut = true
					return false
				}
			}
		}
		return cut
	}
	var walk func(parse.Node) parse.Node
	walkList := func(l *parse.ListNode) *parse.ListNode {
		if l == nil {
			return nil
		}
		if w := walk(l); w != nil {
			return w.(*parse.ListNode)
		}
		return nil
	}
	walk = func(n parse.Node) parse.Node {
		if drop(n) {
			return nil
		}
		switch n := n.(type) {
		case *parse.ListNode:
			kept := []parse.Node{}
			for _, c := range n.Nodes {
				if w := walk(c); w != nil {
					kept = append(kept, w)
				}
			}
			n.Nodes = kept
		case *parse.IfNode:
			walkBranch(&n.BranchNode, walkList)
		case *parse.RangeNode:
			walkBranch(&n.BranchNode, walkList)
		case *parse.WithNode:
			walkBranch(&n.BranchNode, walkList)
		case *parse.ActionNode:
			p := walk(n.Pipe)
			if p == nil {
				return nil
			}
			n.Pipe = p.(*parse.PipeNode)
		case *parse.PipeNode:
			var cmds []*parse.CommandNode
			for _, c := range n.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if w := walk(a); w != nil {
						args = append(args, w)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				cmds = append(cmds, c)
			}
			if len(cmds) == 0 {
				return nil
			}
			n.Cmds = cmds
		}
		return n
	}
	out := walk(root.CopyList())
	if out == nil {
		return &parse.ListNode{NodeType: parse.NodeList}
	}
	return out.(*parse.ListNode)
}

func walkBranch(b *parse.BranchNode, walkList func(*parse.ListNode) *parse.ListNode) {
	if body := walkList(b.List); body != nil {
		b.List = body
	} else {
		b.List = &parse.ListNode{NodeType: parse.NodeList}
	}
	b.ElseList = walkList(b.ElseList)
}

func render(c inCase) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	if c.Data != nil {
		var data any
		if err := json.Unmarshal(c.Data, &data); err != nil {
			return "", err
		}
		err := tmpl.Execute(&b, data)
		return b.String(), err
	}
	vars := map[string]bool{}
	for _, t := range tmpl.Templates() {
		if err := names(t.Tree.Root, vars); err != nil {
			return "", err
		}
	}
	if !vars["messages"] && !vars["response"] {
		tail, _ := template.New("tail").Parse("{{ .Response }}")
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, tail.Tree.Root.Nodes...)
	}
	think, level := false, ""
	switch v := c.Think.(type) {
	case bool:
		think = v
		if v {
			level = "medium"
		}
	case string:
		think, level = true, v
	}
	// Consecutive messages of one role (but tool) become one; system texts are joined.
	var systems []string
	var msgs []*Message
	for _, in := range c.Messages {
		m := &Message{Role: in.Role, Content: in.Content, Thinking: in.Thinking, ToolName: in.ToolName,
			ToolCallID: in.ToolCallID}
		for _, tc := range in.ToolCalls {
			m.ToolCalls = append(m.ToolCalls, Call{ID: tc.ID, Function: CallFunction{Index: tc.Function.Index,
				Name: tc.Function.Name, Arguments: Args(tc.Function.Arguments)}})
		}
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(msgs); n > 0 && msgs[n-1].Role == m.Role && m.Role != "tool" {
			msgs[n-1].Content += "\n\n" + m.Content
			continue
		}
		msgs = append(msgs, m)
	}
	if vars["messages"] {
		var tools Tools
		if c.Tools != nil {
			tools = *c.Tools
		}
		err := tmpl.Execute(&b, map[string]any{"System": strings.Join(systems, "\n\n"), "Messages": msgs,
			"Tools": tools, "Response": "", "Think": think, "ThinkLevel": level, "IsThinkSet": c.Think != nil})
		return b.String(), err
	}
	// Legacy: one run per prompt/response pair, then the last pair up to .Response.
	system, prompt, response := "", "", ""
	values := func() map[string]any {
		return map[string]any{"System": system, "Prompt": prompt, "Response": response, "Think": think,
			"ThinkLevel": level, "IsThinkSet": c.Think != nil}
	}
	flush := func() error {
		err := tmpl.Execute(&b, values())
		system, prompt, response = "", "", ""
		return err
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	last, err := template.New("").AddParseTree("", &parse.Tree{Root: cutAfterResponse(tmpl.Tree.Root)})
	if err != nil {
		return "", err
	}
	if err := last.Execute(&b, values()); err != nil {
		return "", err
	}
	return b.String(), nil
}

func main() {
	var cases []inCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(2)
	}
	results := make([]map[string]string, len(cases))
	for i, c := range cases {
		out, err := render(c)
		if err != nil {
			results[i] = map[string]string{"error": err.Error()}
		} else {
			results[i] = map[string]string{"out": out}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(results); err != nil {
		os.Exit(2)
	}
}
