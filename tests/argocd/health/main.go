// Command argocd-health gives the health Argo CD's application controller gives each object:
// the argocd-cm ConfigMap named first (gitops/argocd/argocd-cm-patch.yaml) is read by Argo CD's
// own settings manager, the health script is looked up for the object's group and kind as the
// controller looks it up, and gitops-engine's GetResourceHealth runs it in Argo CD's Lua VM.
//
//	argocd-health ARGOCD_CM_YAML OBJECT_YAML...
//
// Prints one JSON line per object: {"path", "status", "message"}, or {"path", "error"}.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/argoproj/argo-cd/v3/util/lua"
	"github.com/argoproj/argo-cd/v3/util/settings"
	"github.com/argoproj/gitops-engine/pkg/health"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/yaml"
)

const namespace = "argocd"

type result struct {
	Path    string `json:"path"`
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: argocd-health ARGOCD_CM_YAML OBJECT_YAML...")
		os.Exit(2)
	}
	overrides, err := resourceOverrides(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "argocd-health: %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	out := json.NewEncoder(os.Stdout)
	for _, path := range os.Args[2:] {
		r := result{Path: path}
		status, err := objectHealth(path, overrides)
		switch {
		case err != nil:
			r.Error = err.Error()
		case status == nil:
			r.Error = "Argo CD has no health check for this object"
		default:
			r.Status, r.Message = string(status.Status), status.Message
		}
		if err := out.Encode(r); err != nil {
			os.Exit(1)
		}
	}
}

// resourceOverrides loads the ConfigMap as Argo CD's settings manager does, from a cluster
// (a fake clientset) holding it and the argocd-secret every installation has.
func resourceOverrides(path string) (lua.ResourceHealthOverrides, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var cm corev1.ConfigMap
	if err := yaml.Unmarshal(text, &cm); err != nil {
		return nil, err
	}
	cm.Namespace = namespace
	// The settings manager watches only ConfigMaps with Argo CD's part-of label, which the
	// installed argocd-cm has and a patch of it leaves alone.
	if cm.Labels == nil {
		cm.Labels = map[string]string{}
	}
	cm.Labels["app.kubernetes.io/part-of"] = "argocd"
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{
		Name: "argocd-secret", Namespace: namespace,
		Labels: map[string]string{"app.kubernetes.io/part-of": "argocd"},
	}}
	manager := settings.NewSettingsManager(context.Background(), fake.NewClientset(&cm, secret), namespace)
	overrides, err := manager.GetResourceOverrides()
	if err != nil {
		return nil, err
	}
	return overrides, nil
}

func objectHealth(path string, overrides lua.ResourceHealthOverrides) (*health.HealthStatus, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	obj := &unstructured.Unstructured{}
	if err := yaml.Unmarshal(text, &obj.Object); err != nil {
		return nil, err
	}
	return health.GetResourceHealth(obj, overrides)
}
