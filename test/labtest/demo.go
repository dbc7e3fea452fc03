package labtest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab/demo"
)

// Truth tables of the demo: the pairs that connect after each step.
var demoTables = [][]string{
	{"a->b", "a->c", "b->a", "b->c", "c->a", "c->b"},
	{},
	{"a->b"},
}

// AssertDemo runs the steps of `sluicectl lab demo` in a lab and checks
// each matrix against its truth table.
func AssertDemo(t *testing.T, l *Lab) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d, err := demo.New(l.State)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	steps := demo.Steps()
	if len(steps) != len(demoTables) {
		t.Fatalf("the demo has %d steps, the test knows %d", len(steps), len(demoTables))
	}
	for i, st := range steps {
		want := demo.Expect(func(demo.Pair) bool { return false })
		for _, p := range demoTables[i] {
			from, to, _ := strings.Cut(p, "->")
			want[demo.Pair{From: from, To: to}] = true
		}
		if !st.Want.Equal(want) {
			t.Fatalf("step %q expects\n%s\nthe truth table says\n%s", st.Title, d.Format(st.Want, want), d.Format(want, want))
		}
		if err := st.Apply(ctx, l.Client); err != nil {
			t.Fatal(err)
		}
		got, err := d.WaitFor(ctx, want)
		if err != nil {
			t.Errorf("step %q: %v\n%s", st.Title, err, d.Format(got, want))
		}
	}
}
