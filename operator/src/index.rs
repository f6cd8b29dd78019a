//! Secondary indexes over the watch caches: objects by a key computed from each object (the
//! cache key of an SD35Deployment, the owner of a child, the instance label of a pod).
//!
//! An index is fed by the same watch events as its store, before the store sees them, so by
//! the time an object triggers a reconcile it is findable by key. A lookup costs the size of
//! its answer, never the size of the store: the operator's work per event does not grow with
//! the number of objects it manages.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

type KeyFn<K> = dyn Fn(&K) -> Vec<String> + Send + Sync;

/// Objects of kind `K` by the keys a function computes from them.
pub struct Index<K>
where
    K: Resource<DynamicType = ()>,
{
    inner: Arc<RwLock<Inner<K>>>,
    keys: Arc<KeyFn<K>>,
}

impl<K: Resource<DynamicType = ()>> Clone for Index<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            keys: self.keys.clone(),
        }
    }
}

impl<K: Resource<DynamicType = ()>> std::fmt::Debug for Index<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.inner.read().map(|i| i.keys_of.len()).unwrap_or(0);
        f.debug_struct("Index").field("objects", &len).finish()
    }
}

struct Inner<K: Resource<DynamicType = ()>> {
    by_key: HashMap<String, HashSet<ObjectRef<K>>>,
    keys_of: HashMap<ObjectRef<K>, Vec<String>>,
    /// Objects of a relist in progress, swapped in whole when it completes (as the store does).
    relist: Option<Vec<(ObjectRef<K>, Vec<String>)>>,
}

impl<K: Resource<DynamicType = ()>> Inner<K> {
    fn remove(&mut self, r: &ObjectRef<K>) {
        for key in self.keys_of.remove(r).unwrap_or_default() {
            if let Some(set) = self.by_key.get_mut(&key) {
                set.remove(r);
                if set.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    fn insert(&mut self, r: ObjectRef<K>, keys: Vec<String>) {
        self.remove(&r);
        for key in &keys {
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(r.clone());
        }
        if !keys.is_empty() {
            self.keys_of.insert(r, keys);
        }
    }
}

/// The reference an index keeps: name and namespace only (what a lookup in the store needs),
/// not the resource version and UID that `ObjectRef::from_obj` also copies.
fn bare_ref<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectRef<K> {
    let mut r = ObjectRef::from_obj(obj);
    r.extra = Default::default();
    r
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + 'static,
{
    /// An empty index computing each object's keys with `keys`.
    pub fn new(keys: impl Fn(&K) -> Vec<String> + Send + Sync + 'static) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Inner {
                by_key: HashMap::new(),
                keys_of: HashMap::new(),
                relist: None,
            })),
            keys: Arc::new(keys),
        }
    }

    /// Applies one watch event, as the reflector applies it to the store.
    pub fn apply_watcher_event(&self, event: &watcher::Event<K>) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        match event {
            watcher::Event::Apply(obj) => {
                let keys = (self.keys)(obj);
                inner.insert(bare_ref(obj), keys);
            }
            watcher::Event::Delete(obj) => inner.remove(&bare_ref(obj)),
            watcher::Event::Init => inner.relist = Some(Vec::new()),
            watcher::Event::InitApply(obj) => {
                let keys = (self.keys)(obj);
                inner
                    .relist
                    .get_or_insert_with(Vec::new)
                    .push((bare_ref(obj), keys));
            }
            watcher::Event::InitDone => {
                let listed = inner.relist.take().unwrap_or_default();
                inner.by_key.clear();
                inner.keys_of.clear();
                for (r, keys) in listed {
                    inner.insert(r, keys);
                }
            }
        }
    }

    /// The objects under `key`.
    pub fn get(&self, key: &str) -> Vec<ObjectRef<K>> {
        self.inner
            .read()
            .ok()
            .and_then(|i| i.by_key.get(key).map(|s| s.iter().cloned().collect()))
            .unwrap_or_default()
    }
}

/// `namespace/value`: index keys are namespaced, since keys repeat across namespaces.
pub fn namespaced(namespace: &str, value: &str) -> String {
    format!("{namespace}/{value}")
}

/// The keys of a child: the UID of its controller owner, if any.
pub fn controller_uid<K: Resource>(obj: &K) -> Vec<String> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn cm(name: &str, key: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([("k".to_owned(), key.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn label(o: &ConfigMap) -> Vec<String> {
        o.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("k"))
            .map(|v| vec![namespaced("ns", v)])
            .unwrap_or_default()
    }

    fn names(v: Vec<ObjectRef<ConfigMap>>) -> Vec<String> {
        let mut n: Vec<String> = v.into_iter().map(|r| r.name).collect();
        n.sort();
        n
    }

    #[test]
    fn objects_are_found_by_key_and_move_when_their_key_changes() {
        let index = Index::new(label);
        index.apply_watcher_event(&watcher::Event::Apply(cm("a", "x")));
        index.apply_watcher_event(&watcher::Event::Apply(cm("b", "x")));
        index.apply_watcher_event(&watcher::Event::Apply(cm("c", "y")));
        assert_eq!(names(index.get("ns/x")), ["a", "b"]);
        index.apply_watcher_event(&watcher::Event::Apply(cm("b", "y")));
        assert_eq!(names(index.get("ns/x")), ["a"]);
        assert_eq!(names(index.get("ns/y")), ["b", "c"]);
        index.apply_watcher_event(&watcher::Event::Delete(cm("a", "x")));
        assert!(index.get("ns/x").is_empty());
        assert!(index.get("other/y").is_empty(), "keys are namespaced");
    }

    #[test]
    fn a_relist_replaces_the_index_when_it_completes() {
        let index = Index::new(label);
        index.apply_watcher_event(&watcher::Event::Apply(cm("gone", "x")));
        index.apply_watcher_event(&watcher::Event::Init);
        index.apply_watcher_event(&watcher::Event::InitApply(cm("new", "x")));
        // Until the relist is done, lookups answer from the previous state.
        assert_eq!(names(index.get("ns/x")), ["gone"]);
        index.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(names(index.get("ns/x")), ["new"]);
    }
}
