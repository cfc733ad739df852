// pss-check: the Kubernetes Pod Security Standards, checked on rendered manifests.
//
// It runs the upstream Pod Security Admission library (k8s.io/pod-security-admission,
// the code the API server's PodSecurity admission plugin runs) on the pod template of
// every workload in a multi-document YAML file, at one level and any number of policy
// versions, so a manifest is judged exactly as a namespace labelled
// pod-security.kubernetes.io/enforce=<level> would judge it.
//
//	pss-check -level restricted -versions v1.31,latest FILE
//
// Prints one line per workload and version; exits 1 when any is not allowed, 2 on bad
// usage or input. Built by deploy/tools.sh (make deploy-check) into .cache/bin.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
	"sigs.k8s.io/yaml"
)

// workload is one object that carries a pod, with that pod's metadata and spec.
type workload struct {
	name string
	meta *metav1.ObjectMeta
	spec *corev1.PodSpec
}

func main() {
	level := flag.String("level", "restricted", "baseline or restricted")
	versions := flag.String("versions", "latest", "comma-separated policy versions (v1.x or latest)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: pss-check [-level L] [-versions v1.x,latest] FILE")
		os.Exit(2)
	}
	code, err := run(flag.Arg(0), *level, strings.Split(*versions, ","))
	if err != nil {
		fmt.Fprintln(os.Stderr, "pss-check:", err)
		os.Exit(2)
	}
	os.Exit(code)
}

func run(path, levelName string, versionNames []string) (int, error) {
	level, err := api.ParseLevel(levelName)
	if err != nil {
		return 2, fmt.Errorf("-level %s: %w", levelName, err)
	}
	evaluator, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		return 2, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 2, err
	}
	workloads, err := parse(data)
	if err != nil {
		return 2, fmt.Errorf("%s: %w", path, err)
	}
	if len(workloads) == 0 {
		return 2, fmt.Errorf("%s: no workload with a pod template", path)
	}
	code := 0
	for _, name := range versionNames {
		version, err := api.ParseVersion(name)
		if err != nil {
			return 2, fmt.Errorf("-versions %s: %w", name, err)
		}
		lv := api.LevelVersion{Level: level, Version: version}
		for _, w := range workloads {
			result := policy.AggregateCheckResults(evaluator.EvaluatePod(lv, w.meta, w.spec))
			if result.Allowed {
				fmt.Printf("%s: allowed by %s\n", w.name, lv)
			} else {
				fmt.Printf("%s: violates %s: %s\n", w.name, lv, result.ForbiddenDetail())
				code = 1
			}
		}
	}
	return code, nil
}

// parse returns the pod of every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
// Job and CronJob in a multi-document YAML stream; other kinds are skipped.
func parse(data []byte) ([]workload, error) {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var found []workload
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return found, nil
		}
		if err != nil {
			return nil, err
		}
		var head metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &head); err != nil {
			return nil, err
		}
		w, err := podOf(head.Kind, doc)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", head.Kind, err)
		}
		if w != nil {
			found = append(found, *w)
		}
	}
}

func podOf(kind string, doc []byte) (*workload, error) {
	strict := func(v any) error { return yaml.UnmarshalStrict(doc, v) }
	switch kind {
	case "Pod":
		var o corev1.Pod
		if err := strict(&o); err != nil {
			return nil, err
		}
		return &workload{"Pod/" + o.Name, &o.ObjectMeta, &o.Spec}, nil
	case "Deployment":
		var o appsv1.Deployment
		if err := strict(&o); err != nil {
			return nil, err
		}
		return &workload{"Deployment/" + o.Name, &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec}, nil
	case "StatefulSet":
		var o appsv1.StatefulSet
		if err := strict(&o); err != nil {
			return nil, err
		}
		return &workload{"StatefulSet/" + o.Name, &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec}, nil
	case "DaemonSet":
		var o appsv1.DaemonSet
		if err := strict(&o); err != nil {
			return nil, err
		}
		return &workload{"DaemonSet/" + o.Name, &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec}, nil
	case "ReplicaSet":
		var o appsv1.ReplicaSet
		if err := strict(&o); err != nil {
			return nil, err
		}
		return &workload{"ReplicaSet/" + o.Name, &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec}, nil
	case "Job":
		var o batchv1.Job
		if err := strict(&o); err != nil {
			return nil, err
		}
		return &workload{"Job/" + o.Name, &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec}, nil
	case "CronJob":
		var o batchv1.CronJob
		if err := strict(&o); err != nil {
			return nil, err
		}
		t := &o.Spec.JobTemplate.Spec.Template
		return &workload{"CronJob/" + o.Name, &t.ObjectMeta, &t.Spec}, nil
	}
	return nil, nil
}
